"""python -m cusdpa bench at toy sizes: every part writes its table, valid JSON and PNG plots; a wrong or
crashing backend is recorded (failed / error) and the rest still runs."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest

from benchmarks.bench import PRESETS, Options, config, device, plots, providers, report, sdpa, timing
from cusdpa import environment
from cusdpa.backends import math as math_backend

pytest.importorskip("torch")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

PNG = b"\x89PNG\r\n\x1a\n"


def _strict_json(path):
    """Parse as standard JSON: NaN and Infinity are not JSON."""
    return json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in {path}"))


def test_bench_runs_every_part_and_writes_table_json_and_plots(tmp_path):
    providers = ["cusdpa", "cusdpa-efficient", "cusdpa-math", "torch", "torch-flash", "torch-math"]
    cmd = [sys.executable, "-m", "cusdpa", "bench", "--preset", "tiny", "--out", str(tmp_path), "--lengths", "8",
           "--causal", "causal", "--providers", *providers]
    # aot_eager: part c through torch.compile's graph capture without waiting for a C++ compiler
    run = subprocess.run(cmd + ["--compile-backend", "aot_eager"], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, NUMBA_ENABLE_CUDASIM="1"))
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    tables = (tmp_path / "tables.md").read_text()
    doc = _strict_json(tmp_path / "results.json")
    on_cpu = bool(environment.cupy_problem())
    if on_cpu:
        assert "no GPU comparison: it needs a CUDA GPU" in run.stdout
        # every table says what a CPU run is, on screen and in tables.md; so do the plots' titles (in plots.py)
        assert doc["caveat"] == device.CPU_CAVEAT and "not a performance result" in device.CPU_CAVEAT
        assert run.stdout.count(device.CPU_CAVEAT) == 4 and tables.count(device.CPU_CAVEAT) == 5  # + the head
    for title in ("(a) SDPA", "(b) CausalSelfAttention", "(c) CausalSelfAttention under torch.compile",
                  "(d) standard grid"):
        assert title in run.stdout and title in tables
    # torch's nested-tensor SDPA logs why it refuses a nested batch, and nested_tensor_from_jagged a notice
    # about torch's own API: neither reaches the screen, and the refusal's reason is in the n/a record
    assert "not used because" not in run.stderr and "is_fx_tracing" not in run.stderr, run.stderr[-3000:]
    nested = next(r for r in doc["records"] if r["part"] == "b" and r["batch"] == "nested" and r["provider"] == "torch")
    if nested["status"] == "n/a":
        assert "No viable backend" in nested["reason"]

    assert doc["finished"] and doc["options"]["sizes"]["lengths"] == [8]
    records = doc["records"]
    assert {r["part"] for r in records} == {"a", "b", "c", "d"}
    assert not [r for r in records if r["status"] in ("failed", "error")]
    grid = [r for r in records if r["part"] == "d"]
    assert len(grid) == len(providers) * 2  # one point, forward and backward
    for r in grid:
        if r["status"] == "ok":
            assert r["tflops"] == pytest.approx(r["flops"] / r["ms"] / 1e9)
            assert max(r["error"].values()) < 1e-2
    measured = {(r["provider"], r["direction"]) for r in grid if r["status"] == "ok"}
    assert {("cusdpa-math", "fwd"), ("cusdpa-math", "bwd"), ("torch-math", "bwd")} <= measured
    assert {(r["cusdpa"], r["torch"], r["direction"]) for r in doc["ratios"]} >= {("cusdpa-math", "torch-math", "bwd")}
    compiled = [r for r in records if r["part"] == "c" and r["mode"] == "compiled"]
    assert len(compiled) == 2 and all(r["status"] == "ok" and r["compile_s"] > 0 for r in compiled)
    for png in ("grid_float16.png", "tutorial.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG


def _cpu():
    import torch

    return device.Device(False, torch, PRESETS["tiny"])


def _measure(tmp_path, providers, directions=("fwd", "bwd"), **options):
    opts = Options(sizes=PRESETS["tiny"], out=tmp_path, providers=tuple(providers), **options)
    results = report.Results(tmp_path, {})
    point = device.Point(2, 2, 8, 8, 16, "float16", True)
    sdpa.measure("d", point, opts.providers_for("d"), directions, opts, _cpu(), results, 0, lambda n=1: None)
    return {(r["provider"], r["direction"]): r for r in results.records}, _strict_json(results.path)


def test_a_wrong_backend_fails_its_check_and_is_not_timed(tmp_path, monkeypatch):
    right = math_backend.IMPL.forward

    def forward(pr, out=None, lse=None):
        out, lse = right(pr, out, lse)
        out[..., 3, :] *= 1.01
        return out, lse

    monkeypatch.setattr(math_backend, "IMPL", dataclasses.replace(math_backend.IMPL, forward=forward))
    got, doc = _measure(tmp_path, ["cusdpa-math", "torch-math"])
    wrong = got["cusdpa-math", "fwd"]
    assert wrong["status"] == "failed" and "out: max error" in wrong["reason"] and "ms" not in wrong
    assert got["cusdpa-math", "bwd"]["status"] == "ok"  # the backward never used the broken forward
    assert got["torch-math", "fwd"]["status"] == "ok" and got["torch-math", "fwd"]["ms"] > 0
    assert len(doc["records"]) == 4


def test_a_crashing_backend_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    def backward(*args, **kwargs):
        raise MemoryError("out of memory")

    monkeypatch.setattr(math_backend, "IMPL", dataclasses.replace(math_backend.IMPL, backward=backward))
    got, _ = _measure(tmp_path, ["cusdpa-math", "cusdpa-flash", "torch-math"])
    assert got["cusdpa-math", "bwd"]["status"] == "error" and "MemoryError" in got["cusdpa-math", "bwd"]["reason"]
    assert got["cusdpa-math", "fwd"]["status"] == "ok"
    assert got["cusdpa-flash", "fwd"]["status"] in ("n/a", "ok")  # n/a without CuPy, with cusdpa's reason
    assert got["torch-math", "bwd"]["status"] == "ok"


def test_slow_providers_are_skipped_beyond_their_length_and_say_why(tmp_path):
    opts = Options(efficient_bwd_max_len=4)
    assert "--efficient-bwd-max-len" in opts.skip_reason(config.BY_ID["cusdpa-efficient"], 8, "bwd")
    assert opts.skip_reason(config.BY_ID["cusdpa-efficient"], 8, "fwd") is None
    got, doc = _measure(tmp_path, ["cusdpa-math", "torch-math", "torch-flash"], ("fwd",), math_max_len=4)
    for pid in ("cusdpa-math", "torch-math"):
        assert got[pid, "fwd"]["status"] == "skipped" and "--math-max-len" in got[pid, "fwd"]["reason"]
    assert got["torch-flash", "fwd"]["status"] == "ok"


def test_results_json_stays_standard_with_infinite_errors(tmp_path):
    results = report.Results(tmp_path, {"command": "test"})
    results.add({"part": "a", "provider": "cusdpa", "status": "failed", "error": {"out": float("inf")}})
    assert _strict_json(results.path)["records"][0]["error"] == {"out": "inf"}


def test_flops_follow_the_protocol():
    p = device.Point(B=2, H=3, L=64, S=64, E=32, dtype="float16", causal=False)
    assert p.flops("fwd") == 4 * 2 * 3 * 64 * 64 * 32
    assert p.flops("bwd") == 2.5 * p.flops("fwd")
    assert dataclasses.replace(p, causal=True).flops("fwd") == p.flops("fwd") / 2
    assert dataclasses.replace(p, causal=True, S=128).flops("fwd") == 4 * 2 * 3 * 64 * 128 * 32  # L != S: no halving


def test_grid_sizes_must_divide():
    with pytest.raises(ValueError, match="length 3000 must divide tokens=16384"):
        Options(sizes=dataclasses.replace(PRESETS["full"], lengths=(3000,)))
    with pytest.raises(ValueError, match="head dim 96 must divide hidden=2048"):
        Options(sizes=dataclasses.replace(PRESETS["full"], head_dims=(96,)))
    points = sdpa.grid_points(Options())
    assert len(points) == 24 and {(p.B * p.L, p.H * p.E) for p in points} == {(16384, 2048)}


def test_the_gpu_sizes_ask_for_a_gpu(capsys):
    if not environment.cupy_problem():
        pytest.skip("this machine has a GPU")
    from cusdpa.__main__ import main

    assert main(["bench", "--quick"]) == 2
    assert "need a CUDA GPU" in capsys.readouterr().err


def test_ratios_keep_two_significant_digits():
    assert [report._ratio(x) for x in (1.0, 0.98, 12.5, 0.1, 0.036, 0.0012, 3.5e-05, 0.0)] == \
        ["1.00", "0.98", "12.50", "0.10", "0.036", "0.0012", "3.5e-05", "0"]


def test_tables_print_small_ratios_and_carry_the_cpu_caveat(tmp_path):
    results = report.Results(tmp_path, {"caveat": device.CPU_CAVEAT})
    point = dict(part="d", dtype="float16", B=2, H=2, L=8, S=8, E=16, causal=False, direction="fwd", status="ok")
    results.add(dict(point, provider="cusdpa-efficient", tflops=3.5e-08))
    results.add(dict(point, provider="torch-math", tflops=1e-3))
    text = report.tables(results, ["d"], ["cusdpa-efficient", "torch-math"])
    title, caveat = text.splitlines()[:2]
    assert title.startswith("(d) standard grid") and caveat == device.CPU_CAVEAT
    row = text.splitlines()[-1]
    assert row.split("|")[-2].strip() == "3.5e-05" and "0.00 " not in row
    assert device.CPU_CAVEAT not in report.tables(report.Results(tmp_path / "gpu", {}), ["d"], ["torch-math"])


def test_plots_take_a_log_axis_where_values_span_orders_of_magnitude():
    scales = []
    plots._log_if_wide([3.5e-08, 1e-3, 2e-3], scales.append)
    plots._log_if_wide([150.0, 400.0], scales.append)
    assert scales == ["log"]


def test_one_interrupted_probe_does_not_make_a_fast_call_slow():
    import itertools

    class Scripted(timing.Timer):
        def __init__(self, times):
            super().__init__(warmup_ms=0.0, rep_ms=10.0, min_runs=1)
            self.times = iter(times)

        def runs(self, fn, n, grad_to_none):
            return [next(self.times) for _ in range(n)]

    fast = Scripted(itertools.chain([50.0], itertools.repeat(0.01)))(lambda: None)
    assert fast.ms == 0.01 and "slow" not in fast.method and fast.runs > 5
    slow = Scripted([50.0, 40.0])(lambda: None)
    assert slow.ms == 45.0 and slow.runs == 2 and "slow call" in slow.method


def test_efficient_runs_the_simulator_knobs_on_the_cpu(monkeypatch):
    kernels_numba = pytest.importorskip("kernels_numba")
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "1")
    point = device.Point(1, 1, 8, 8, 16, "float16", False)
    inputs = device.Inputs((None,) * 4, None)
    with providers.make_run(config.BY_ID["cusdpa-efficient"], inputs, point).context():
        assert kernels_numba.current() == kernels_numba.KernelConfig(**config.SIMULATOR_KNOBS)
    with providers.make_run(config.BY_ID["cusdpa-math"], inputs, point).context():
        assert kernels_numba.current() == kernels_numba.KernelConfig()
