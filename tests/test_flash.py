"""FLASH backend: nvcc compiles every kernel configuration (CPU), and on the GPU the kernels match the
reference over sizes and features, judged against PyTorch's error at the same precision."""
import concurrent.futures
import dataclasses
import itertools
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cusdpa.backends import flash
from cusdpa.backends.flash import config, decode, launches, sources
from cusdpa.verify.harness import Case, build, draw, run_case

# One representative (E, Ev) per tile configuration class, incl. E != Ev, the split dK/dV passes, the
# Hopper tiles of 64-byte swizzle and the wide Hopper backward's two swizzles.
CONFIG_DIMS = [(40, 40), (64, 64), (64, 128), (72, 128), (96, 64), (160, 224), (192, 128), (256, 256)]


def _nvrtc_jobs():
    for E, Ev in CONFIG_DIMS:
        cfg = config.FlashConfig.for_head_dims(E, Ev)
        # the dtype changes only the mma type and conversions, dropout only adds code: pair them up
        for dtype, dropout in (("float16", False), ("bfloat16", True)):
            yield "flash_fwd.cu", sources.compile_options(dtype, E, Ev, dropout, cfg)
            # + the Hopper forward tiles of short and causal problems
            for fwd_cfg in {config.FlashConfig.for_problem(E, Ev, L, c) for L in (1024, 2048, 16384) for c in (0, 1)}:
                if config.sm90_forward_applies(E, Ev, 90, fwd_cfg):  # (O stored by TMA where for_problem says)
                    yield "flash_fwd_sm90.cu", sources.compile_options(  # (the host's schedule without clusters)
                        dtype, E, Ev, dropout, fwd_cfg, tma_store=fwd_cfg.fwd90_tma_store,
                        scheduled=launches.deals_by_schedule(fwd_cfg, False, False)) + ("-arch=sm_90a",)
                    if fwd_cfg.fwd90_stages == 2:  # ... a packed batch's (register stores), its tiles from the queue
                        packed = dataclasses.replace(fwd_cfg, fwd90_cluster=1)  # (as sm90_forward_config gives it)
                        yield "flash_fwd_sm90.cu", sources.compile_options(dtype, E, Ev, dropout, packed, queue=True) + (
                            "-arch=sm_90a",)
                    if fwd_cfg.fwd90_tma_store and (E, Ev) in ((64, 64), (96, 64), (160, 224)) and dropout:  # ... with
                        # the phase clocks, O from 128- and 64-byte swizzled rows, idle warpgroups skipping their
                        # tiles, warpgroups stopping at their own key blocks
                        phased = dataclasses.replace(fwd_cfg, fwd90_phases=True, fwd90_skip_idle=True,
                                                     fwd90_wg_blocks=True)
                        yield "flash_fwd_sm90.cu", sources.compile_options(dtype, E, Ev, dropout, phased,
                                                                           tma_store=True) + ("-arch=sm_90a",)
            if (E, Ev) == (64, 64) and dropout:  # ... split tiles with ALiBi and soft-capping (scores in natural units)
                split_cfg = config.FlashConfig.for_problem(E, Ev, 1024, False)
                yield "flash_fwd_sm90.cu", sources.compile_options(dtype, E, Ev, dropout, split_cfg, alibi=True,
                                                                   softcap=True, tma_store=True) + ("-arch=sm_90a",)
            if (E, Ev) in ((64, 64), (96, 64), (256, 256)) and dropout:
                # ... with clusters sharing the key blocks (three warpgroups, 64-byte rows, 80-key blocks), idle
                # warpgroups walking their tiles
                clustered = dataclasses.replace(config.FlashConfig.for_problem(E, Ev, 4096, False), fwd90_cluster=2,
                                                fwd90_skip_idle=True, fwd90_split_last=False).fitted(E, Ev)
                yield "flash_fwd_sm90.cu", sources.compile_options(dtype, E, Ev, dropout, clustered,
                                                                   tma_store=clustered.fwd90_tma_store) + ("-arch=sm_90a",)
            # ... and with each kind of attn_mask (its tiles from the queue)
            for mask in (("bool", "float16") if dtype == "float16" else ("float32", "bfloat16")):
                fwd_cfg = config.FlashConfig.for_problem(E, Ev, 4096, False, mask)
                # (the clocks' masked walk, idle warpgroups' walk of a queue's tiles, warpgroups' own blocks)
                knobs = (E, Ev) == (64, 64)
                fwd_cfg = dataclasses.replace(fwd_cfg, fwd90_phases=knobs, fwd90_skip_idle=knobs, fwd90_wg_blocks=knobs)
                if config.sm90_forward_applies(E, Ev, 90, fwd_cfg):
                    yield "flash_fwd_sm90.cu", sources.compile_options(dtype, E, Ev, dropout, fwd_cfg, mask=mask,
                                                                       queue=True) + ("-arch=sm_90a",)
            for part in ((1, 2) if cfg.split_dkdv else (3,)):
                yield "flash_bwd.cu", sources.compile_options(dtype, E, Ev, dropout, cfg, part)
            if config.sm90_backward_applies(E, Ev, 90, cfg):
                source = "flash_bwd_sm90_wide.cu" if config.sm90_backward_is_wide(E, Ev) else "flash_bwd_sm90.cu"
                yield source, sources.compile_options(dtype, E, Ev, dropout, cfg) + ("-arch=sm_90a",)
                # ... with an attn_mask, in the tiles dispatch gives masked problems: bool everywhere, float
                # masks (16-bit pairs to a register, float32 in halves: the register-tight cases) at three dims
                masks = ("bool",) if dropout else ()
                if E == Ev and E in (64, 128, 256):
                    masks += ("float32",) if dropout else ("float16",)
                for mask in masks:
                    mask_cfg = config.FlashConfig.for_problem(E, Ev, 4096, False, mask)
                    yield source, sources.compile_options(dtype, E, Ev, dropout, mask_cfg, mask=mask) + ("-arch=sm_90a",)
                    if mask != "bool" and not config.sm90_backward_is_wide(E, Ev):  # ... storing its gradient
                        yield source, sources.compile_options(dtype, E, Ev, dropout, mask_cfg, mask=mask,
                                                              mask_grad=True) + ("-arch=sm_90a",)
                if E == Ev and E in (64, 128, 256) and dropout:  # ... and ALiBi and soft-capping, both ways
                    mod_cfg = config.FlashConfig.for_problem(E, Ev, 4096, False, "bool", softcap=True)
                    for src in (source, "flash_fwd_sm90.cu"):
                        yield src, sources.compile_options(dtype, E, Ev, dropout, mod_cfg, mask="bool", alibi=True,
                                                           softcap=True, queue=src != source) + ("-arch=sm_90a",)
    for (E, Ev), dtype, paged, modifiers in (((64, 64), "float16", False, False), ((128, 128), "bfloat16", True, True),
                                             ((192, 128), "bfloat16", True, False), ((256, 256), "float16", False, True),
                                             ((40, 40), "bfloat16", False, False)):  # split-KV decode
        yield "flash_decode.cu", decode.compile_options(dtype, E, Ev, paged, modifiers, modifiers)
        if decode.tma_head_dims(E, Ev):  # ... with its blocks by TMA (decode.TMA_BLOCKS; sm_90 only)
            yield "flash_decode.cu", decode.compile_options(dtype, E, Ev, paged, modifiers, modifiers, True) + (
                "-arch=sm_90",)
    # ... and the splits' merge loading 32 partials a batch (decode.MERGE_UNROLL, benchmarks/decode.py --config)
    yield "flash_decode.cu", tuple("-DDEC_MERGE_UNROLL=32" if o.startswith("-DDEC_MERGE_UNROLL=") else o
                                   for o in decode.compile_options("bfloat16", 128, 128, True, False, False))
    # ... and bounded to two splits (decode.MAX_SPLITS under a warp's 32, stage decode-splits)
    yield "flash_decode.cu", tuple("-DDEC_MAX_SPLITS=2" if o.startswith("-DDEC_MAX_SPLITS=") else o
                                   for o in decode.compile_options("bfloat16", 128, 128, False, False, False))
    # ... and with its warps' phase clocks (decode.PHASES, benchmarks/decode.py --phases), either copy
    for tma in (False, True):
        yield "flash_decode.cu", decode.compile_options("bfloat16", 128, 128, False, False, False, tma) + (
            "-DCUSDPA_PHASES=1",) + (("-arch=sm_90",) if tma else ())
    for mask in sources.MASK_CODES:  # the attn_mask's summary (kernels_cuda/mask_summary.cu)
        if mask:
            yield "mask_summary.cu", ("-std=c++17", f"-DATTN_MASK={sources.MASK_CODES[mask]}")


def _on_two_threads(fn, jobs) -> list:
    """fn of each job, two at a time: NVRTC and nvcc run outside the GIL, and CI's machine has two cores."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(fn, jobs))


def _arch(options: tuple) -> str | None:
    """The one architecture a compile job is for (its ``-arch=`` option), or None: any."""
    return next((o.split("=", 1)[1] for o in options if o.startswith("-arch=")), None)


def _nvrtc_compile(source: str, options: tuple, arch: str) -> str | None:
    """Compile as CuPy does at run time (NVRTC, no system headers); None or the error log."""
    from cuda.bindings import nvrtc

    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), b"k.cu", 0, [], [])
    opts = [o.encode() for o in options] + [f"-arch={arch}".encode()]
    (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    log = None
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        buf = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, buf)
        log = buf.decode(errors="replace")
    nvrtc.nvrtcDestroyProgram(prog)
    return log


def test_every_kernel_configuration_compiles_with_nvrtc():
    pytest.importorskip("cuda.bindings.nvrtc")
    try:
        from cuda.bindings import nvrtc

        nvrtc.nvrtcVersion()
    except Exception as e:  # the bindings are there but libnvrtc is not
        pytest.skip(f"NVRTC not loadable: {e}")
    # CuPy passes the CUDA toolkit's include dir at run time; numba-cuda ships the same fp16/bf16 headers.
    numba_cuda = pytest.importorskip("numba_cuda")
    include = Path(numba_cuda.__file__).parent / "numba" / "cuda" / "include" / "13"
    if not (include / "cuda_bf16.h").exists():
        pytest.skip(f"no cuda_bf16.h under {include}")
    def compile_one(job):
        source, options = job
        arch = _arch(options) or "sm_90"
        options = tuple(o for o in options if not o.startswith("-arch=")) + (f"-I{include}",)
        log = _nvrtc_compile(sources.kernel_source(source, options), options, arch)
        return None if log is None else f"{source} {options}:\n{log[-2000:]}"

    errors = [e for e in _on_two_threads(compile_one, _nvrtc_jobs()) if e]
    assert not errors, "\n\n".join(errors)


def test_efficient_tile_loops_compile_with_nvrtc():
    """The EFFICIENT backend's linked CUDA C (kernels_cuda/efficient_*.cuh) compiles as Numba compiles it (NVRTC, no
    headers, relocatable device code): forward, dq and dk/dv at each of their padded head dims and element family, and
    with dropout and each mask kind compiled in at one of them; the fused dk/dv + dQ loop likewise where a warp takes
    whole rows (16-bit up to head dim 128, fp32 up to 96)."""
    pytest.importorskip("cuda.bindings.nvrtc")
    from kernels_numba import tensor_core

    def head_dims(kind, elem):
        widest = tensor_core.FP32_HEAD_DIM if elem in ("float32", "tf32") else tensor_core.HEAD_DIMS[-1]
        return [d for d in tensor_core.HEAD_DIMS
                if d <= widest and (kind != "fused" or tensor_core.col_parts(d, elem) == 1)]

    kinds = ("forward", "dq", "dkdv")
    jobs = [(head_dim, elem, kind, False, 0)
            for kind in kinds for elem in tensor_core.ELEMS for head_dim in head_dims(kind, elem)]
    jobs += [(head_dim, elem, "fused", False, 0) for elem in tensor_core.ELEMS for head_dim in head_dims("fused", elem)]
    jobs += [(64, "float32", "fused", True, mask, 0, False, True, False, True) for mask in (1, 4)]
    # fp32's fused loop on column parts (head dim 128: dynamic shared memory), with and without shared scores
    jobs += [(128, elem, "fused", dropout, mask, 0, mask_tile, fast_split, shared, True)
             for elem, dropout, mask, mask_tile, fast_split, shared in
             (("float32", False, 0, False, True, True), ("float32", True, 1, True, True, True),
              ("float32", False, 4, False, False, False), ("tf32", True, 2, False, False, True))]
    jobs += [(64, elem, kind, True, mask) for kind in kinds for elem in ("bfloat16", "float32")
             for mask in range(len(tensor_core.MASK_KINDS) + 1)]
    jobs += [(64, "float16", "fused", True, mask) for mask in range(len(tensor_core.MASK_KINDS) + 1)]
    # mask tiles (KernelConfig.tensor_core_mask_tiles), every mask kind
    jobs += [(head_dim, elem, kind, False, mask, 0, True) for head_dim, elem in ((64, "bfloat16"),
             (128, "float16"), (64, "float32")) for mask in range(1, len(tensor_core.MASK_KINDS) + 1)
             for kind in ("forward", "dq", "dkdv")]
    jobs += [(64, "float16", "fused", False, mask, 0, True) for mask in (1, 3)]
    # fp32's split of tiles that landed finite (KernelConfig.tensor_core_fp32_fast_split)
    jobs += [(head_dim, "float32", kind, dropout, mask, 0, mask_tile, True) for head_dim, dropout, mask, mask_tile in
             ((64, False, 0, False), (128, True, 1, False), (64, False, 4, True)) for kind in kinds]
    # column parts' score products split across the pair (KernelConfig.tensor_core_shared_scores), with the fast split
    jobs += [(head_dim, elem, kind, dropout, mask, 0, mask_tile, fast_split, True)
             for head_dim, elem, dropout, mask, mask_tile, fast_split in
             ((128, "float32", False, 0, False, False), (128, "float32", True, 5, True, False),
              (128, "float32", True, 1, False, True), (128, "float32", False, 4, True, True),
              (128, "tf32", False, 2, True, False), (160, "bfloat16", False, 0, False, False),
              (160, "bfloat16", True, 3, True, False), (256, "bfloat16", False, 0, False, False),
              (256, "bfloat16", True, 4, True, False), (256, "float16", True, 1, False, False))
             for kind in ("dq", "dkdv")]
    # the dk/dv loops' steps of 32 queries in dynamic shared memory (KernelConfig.tensor_core_dynamic_smem)
    jobs += [(128, "bfloat16", "fused", False, 0, 0, False, False, False, True),
             (128, "float16", "fused", True, 1, 0, True, False, False, True),
             (96, "float32", "dkdv", False, 0, 0, False, False, False, True),
             (128, "float32", "dkdv", True, 5, 0, True, True, True, True),
             (256, "bfloat16", "dkdv", True, 3, 0, True, False, True, True)]
    # a broadcast float mask's gradient added into fp32 sums (KernelConfig.tensor_core_mask_grad_sum)
    jobs += [(64, "bfloat16", "dq", True, 3, 0, False, False, False, False, True),
             (192, "float16", "dq", False, 5, 0, True, False, True, False, True),
             (128, "float32", "dq", False, 4, 0, False, True, True, False, True)]

    def compile_one(job):
        name, source = tensor_core.tile_loop_source(*job)
        log = _nvrtc_compile(source, ("-rdc=true", "-std=c++17"), "sm_80")
        return None if log is None else f"{name}:\n{log[-2000:]}"

    errors = [e for e in _on_two_threads(compile_one, jobs) if e]
    assert not errors, "\n\n".join(errors)


def test_efficient_fast_split_is_fp32_s_alone():
    """KernelConfig.tensor_core_fp32_fast_split compiles EFF_FAST_SPLIT into fp32's tile loops alone (16-bit types
    and TF32-allowed fp32 take unsplit operands), and names those loops apart."""
    from kernels_numba import tensor_core

    for elem in tensor_core.ELEMS:
        for kind in ("forward", "dq", "dkdv"):
            name, source = tensor_core.tile_loop_source(64, elem, kind, False, 0, fast_split=True)
            assert ("#define EFF_FAST_SPLIT 1" in source) == (elem == "float32") == name.endswith("_fs")
            plain_name, plain = tensor_core.tile_loop_source(64, elem, kind, False, 0)
            assert "#define EFF_FAST_SPLIT 0" in plain and not plain_name.endswith("_fs")


def test_efficient_mask_grad_sums_are_float_masked_dq_loops_alone():
    """KernelConfig.tensor_core_mask_grad_sum compiles EFF_DMASK_ADD into the dq loops of float masks alone (every other
    loop's source stays as it was), and names them apart."""
    from kernels_numba import tensor_core

    for kind in ("forward", "dq", "dkdv", "fused"):
        for mask_kind in (0, 1, 2, 5):
            name, source = tensor_core.tile_loop_source(64, "float16", kind, False, mask_kind, mask_grad_sum=True)
            want = kind == "dq" and mask_kind >= 2
            assert ("#define EFF_DMASK_ADD 1" in source) == want == name.endswith("_ms"), name
            if not want:
                assert (name, source) == tensor_core.tile_loop_source(64, "float16", kind, False, mask_kind)


def test_efficient_shared_scores_are_column_parts_alone():
    """KernelConfig.tensor_core_shared_scores compiles EFF_SHARE_SCORES into the dq and dk/dv loops that take column
    parts alone (not the forward, the fused loop, or whole-row loops, whose sources stay as they were), and names
    those loops apart."""
    from kernels_numba import tensor_core

    for elem in tensor_core.ELEMS:
        for head_dim in (64, 128, 160, 256):
            for kind in ("forward", "dq", "dkdv", "fused"):
                if kind == "fused" and (elem not in ("float16", "bfloat16") or head_dim > 128) or \
                        elem in ("float32", "tf32") and head_dim > tensor_core.FP32_HEAD_DIM:
                    continue
                name, source = tensor_core.tile_loop_source(head_dim, elem, kind, False, 0, shared_scores=True)
                want = kind in ("dq", "dkdv") and tensor_core.col_parts(head_dim, elem) == 2
                assert ("#define EFF_SHARE_SCORES 1" in source) == want == name.endswith("_ss"), name
                plain_name, plain = tensor_core.tile_loop_source(head_dim, elem, kind, False, 0)
                assert "#define EFF_SHARE_SCORES 1" not in plain and not plain_name.endswith("_ss")
                if not want:
                    assert (name, source) == (plain_name, plain)


def test_shards_split_a_selection_between_processes():
    """tests/conftest.py's --shard I/N (benchmarks/sharded_pytest.sh runs N side by side on the GPU machine): the
    shards' tests are disjoint and together the unsharded selection."""
    def collected(*extra):
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
                              "tests/test_reference.py", *extra], capture_output=True, text=True,
                             cwd=Path(__file__).parent.parent)
        assert run.returncode == 0, run.stdout[-2000:]
        return [line for line in run.stdout.splitlines() if "::" in line]

    shards = [collected("--shard", f"{i}/3") for i in range(3)]
    assert sorted(sum(shards, [])) == sorted(collected()) and all(shards)


def test_sanitizer_report_counts_each_case_s_reports(tmp_path, capsys):
    """benchmarks/sanitize.py --report: a case's reports are the ones logged before its error line; racecheck's
    hazards by kind and both sides (threads 0-127: producer), initcheck's by site, each distinct one counted."""
    from benchmarks import sanitize

    hazard = ("========= Error: Potential RAW hazard detected at __shared__ 0x38404 in block (0,2,0) :\n"
              "=========     Write Thread (1,0,0) at flash_bwd_sm90+0xb070\n"
              "=========     Read Thread (160,0,0) at flash_bwd_sm90+0x1f00\n"
              "=========     Current Value : 183\n")
    uninit = ("========= Uninitialized __global__ memory read of size 16 bytes\n"
              "=========     at flash_bwd_preprocess+0xfc0\n"
              "=========     by thread (0,0,0) in block (0,4,0)\n")
    log = tmp_path / "log"
    log.write_text(hazard * 2 + uninit + "first case      largest error / scale 4.35e-03\n"
                   + "second case     largest error / scale 1.0e-03\n")
    sanitize.report(str(log))
    assert capsys.readouterr().out.splitlines() == [
        "first case:",
        "       2  RAW / Write by producer at flash_bwd_sm90+0xb070 / Read by consumer at flash_bwd_sm90+0x1f00",
        "       1  Uninitialized __global__ memory read at flash_bwd_preprocess+0xfc0",
        "second case: none"]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_efficient_shared_memory_is_what_ptxas_allocates(tmp_path):
    """tensor_core.shared_bytes, which decides the tiles and mask tiles that fit 48 KiB, is the
    static shared memory ptxas allocates for the tile loop, on loops near the limit and with each option."""
    import re

    from kernels_numba import tensor_core

    jobs = [(128, "float16", "forward", False, 2, 0, True), (64, "float32", "forward", True, 4, 0, True),
            (64, "bfloat16", "dq", False, 1, 0, True), (256, "bfloat16", "dq", False, 3, 0, True),
            (128, "float16", "dkdv", False, 4, 0, True), (128, "float16", "dkdv", False, 5, 0, True),
            (160, "bfloat16", "dkdv", False, 0), (128, "float16", "fused", False, 2, 0, True),
            (224, "bfloat16", "dkdv", False, 1, 0, True), (128, "float32", "dkdv", False, 0),
            # shared scores' exchange buffers (KernelConfig.tensor_core_shared_scores)
            (128, "float32", "dq", False, 5, 0, True, False, True),
            (128, "float32", "dkdv", False, 5, 0, True, True, True),
            (192, "bfloat16", "dq", False, 0, 0, False, False, True),
            (192, "bfloat16", "dkdv", False, 3, 0, True, False, True),
            (256, "bfloat16", "dkdv", False, 1, 0, True, False, True)]

    def allocated(n_job):
        n, job = n_job
        name, source = tensor_core.tile_loop_source(*job)
        return name, int(re.search(r"(\d+) bytes smem", _ptxas_report(source, tmp_path / f"t{n}.cu")).group(1))

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(allocated, enumerate(jobs)))
    for job, (name, smem) in zip(jobs, results):
        head_dim, elem, kind, _, mask_kind, block_n, _, _, shared = job + (0, False, False, False)[len(job) - 5:]
        parts = tensor_core.col_parts(head_dim, elem)
        block = {"forward": tensor_core.forward_block_n(head_dim, elem, block_n),
                 "dq": tensor_core.dq_block_n(head_dim, elem), "dkdv": tensor_core.dkdv_block_m(head_dim, elem),
                 "fused": tensor_core.dkdv_block_m(head_dim, elem, True)}[kind]
        tiled = "mt" in name.split("_")
        want = tensor_core.shared_bytes(head_dim, elem, kind, block, parts, mask_kind if tiled else 0,
                                        name.endswith("_ss"))
        assert smem == want <= tensor_core.STATIC_SHARED, (name, smem, want)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_efficient_dynamic_shared_memory_holds_the_32_query_steps(tmp_path):
    """KernelConfig.tensor_core_dynamic_smem: exactly the dk/dv loops that static memory kept at 16 queries a step
    take 32 in dynamic shared memory, which they are launched with (tensor_core.dynamic_bytes: what the carved
    tiles take, within every sm_80+ GPU's limit); their builds declare no static shared memory (ptxas)."""
    import re

    from kernels_numba import tensor_core

    for head_dim in tensor_core.HEAD_DIMS:
        for elem in tensor_core.ELEMS:
            wide = elem in ("float32", "tf32")
            if wide and head_dim > tensor_core.FP32_HEAD_DIM:
                continue
            for kind in ("dkdv", "fused"):
                if kind == "fused" and tensor_core.col_parts(head_dim, elem) > 1 and not wide:
                    continue
                fused = kind == "fused"
                static = tensor_core.dkdv_block_m(head_dim, elem, fused)
                dynamic = tensor_core.takes_dynamic(head_dim, elem, kind, True)
                assert dynamic == (static == 16) and not tensor_core.takes_dynamic(head_dim, elem, kind, False)
                if dynamic:
                    assert tensor_core.dkdv_block_m(head_dim, elem, fused, True) == 32
                    for mask_kind in range(len(tensor_core.MASK_KINDS) + 1):
                        assert tensor_core.dynamic_bytes(head_dim, elem, kind, mask_kind, True, True) <= \
                            tensor_core.DYNAMIC_SHARED
    assert not tensor_core.takes_dynamic(128, "bfloat16", "dq", True)
    for n, job in enumerate([(128, "bfloat16", "fused", False, 0, 0, False, False, False, True),
                             (128, "float32", "dkdv", True, 5, 0, True, True, True, True)]):
        name, source = tensor_core.tile_loop_source(*job)
        assert name.endswith("_dyn") and "_n32_" in name and "#define EFF_DYNAMIC_SMEM 1" in source
        report = _ptxas_report(source, tmp_path / f"d{n}.cu")
        assert not re.search(r"[1-9]\d* bytes smem", report), report


def _ptxas_report(source: str, path) -> str:
    """ptxas's report (nvcc -Xptxas -v, sm_90) of a tile loop's C entry, called from a kernel around it so that
    ptxas reports the shared memory the loop allocates."""
    import re

    params = [p.strip() for p in re.search(r"int EFF_NAME\((.*?)\) \{", source, re.S).group(1).split(",")]
    source += (f'\nextern "C" __global__ void entry({", ".join(params)}) '
               f'{{ EFF_NAME({", ".join(p.split()[-1] for p in params)}); }}\n')
    path.write_text(source)
    run = subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-o", str(path.with_suffix(".cubin")), "-Xptxas", "-v",
                          str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stderr


def test_tf32_error_model_splits_exactly_and_orders_its_modes():
    """benchmarks/tf32_error_model.py: big + small gives x back within TF32's split (2^-21 |x|: small truncated),
    big is x rounded; on a small head, the split rounded to nearest and the loops' truncating one stay within the
    error rule's bound, and chaining the score products' k-steps in one accumulator moves dq further."""
    from benchmarks import tf32_error_model as model
    from cusdpa.verify import judge

    rng = np.random.default_rng(0)
    x = rng.standard_normal(4096).astype(np.float32)
    big, small = model._split(x)
    assert np.all(np.abs(big + small - x) <= 2.0**-21 * np.abs(x))
    assert np.all(np.abs(big - x) <= 2.0**-11 * np.abs(x))
    q, k, v, do = (rng.standard_normal(shape).astype(np.float32) for shape in ((16, 64), (40, 64), (40, 64), (16, 64)))
    ref = model.dq(q, k, v, do, "reference")
    rule = judge.bound("dq", ref, model.dq(q, k, v, do, "fp32"), "float32")
    rounded, truncated, chained = (judge.max_error(model.dq(q, k, v, do, mode), ref)
                                   for mode in ("split", "split-rz", "split-rz-chained"))
    assert rounded > 0 and rule.verdict(rounded) is None and rule.verdict(truncated) is None
    assert chained > 2 * truncated


def test_sass_tool_builds_the_defaults_and_the_knobs_and_tells_changes_apart(tmp_path):
    """benchmarks/sass.py: every forward build under a knob (and fitted: a third K/V stage only where it fits),
    every decode build, and its comparison of two runs' SASS: same text, same opcodes, same multiset, different."""
    from benchmarks import sass

    plain = {name: options for name, _, options, _ in sass.jobs({})}
    knob = {name: options for name, _, options, _ in sass.jobs(config.knobs("fwd90_phases=1,fwd90_stages=3"))}
    assert len(plain) == len(sass.FORWARD) + len(sass.DECODE) == len(knob)
    assert not any("-DCUSDPA_PHASES=1" in options for options in plain.values())
    assert all(("-DCUSDPA_PHASES=1" in options) == name.startswith("fwd_") for name, options in knob.items())
    assert "-DFWD90_STAGES=3" in knob["fwd_e64_64_l1024_full_nomask"]
    assert "-DFWD90_STAGES=3" not in knob["fwd_e256_256_l4096_full_nomask"]
    kernel = "        /*0000*/                   IMAD R1, R2, R3, RZ ;\n        /*0010*/               @P0 BRA 0x40 ;\n"
    variants = {"same": kernel, "renamed": kernel.replace("R1", "R7"),
                "reordered": "\n".join(reversed(kernel.splitlines())), "other": kernel.replace("IMAD", "IADD3")}
    for directory, text in [("before", kernel)] + [(name, text) for name, text in variants.items()]:
        (tmp_path / directory).mkdir()
        (tmp_path / directory / "k.sass").write_text(text)
    verdicts = {name: sass.compare("k", str(tmp_path / name), str(tmp_path / "before")) for name in variants}
    assert verdicts == {"same": "same SASS", "renamed": "same opcodes in the same order, other operands (registers)",
                        "reordered": "same opcodes, another order", "other": "different: 2 -> 2 instructions"}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_every_kernel_configuration_compiles_with_nvcc(tmp_path):
    def compile_one(job):
        n, (source, options) = job
        src = tmp_path / f"k{n}.cu"
        src.write_text(sources.kernel_source(source, options))
        arch = _arch(options)
        if arch:  # a job for one architecture (wgmma: sm_90a)
            options = tuple(o for o in options if not o.startswith("-arch=")) + ("-Xptxas", "-v")
            targets = [f"-gencode=arch={arch.replace('sm_', 'compute_')},code={arch}"]
        else:  # one front-end pass, machine code for both architectures
            targets = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
        cmd = ["nvcc", *targets, "-fatbin", "-o", str(src.with_suffix(".fatbin")), *options, str(src)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            return f"{' '.join(cmd)}\n{run.stderr[-2000:]}"
        # ptxas serialising wgmma (C7510-C7515: registers or control flow in the way) silently costs the
        # overlap the Hopper kernels are built on; a constant operand once did it to the whole backward
        serialised = [line for line in (run.stdout + run.stderr).splitlines() if "are serialized" in line]
        return f"{' '.join(cmd)}\n" + "\n".join(serialised) if serialised else None

    errors = [e for e in _on_two_threads(compile_one, enumerate(_nvrtc_jobs())) if e]
    assert not errors, "\n\n".join(errors)


def test_config_knobs_parse_into_field_types():
    changes = config.knobs("fwd90_stages=3,fwd90_pingpong=0,fwd90_tma_store=1,")
    assert changes == {"fwd90_stages": 3, "fwd90_pingpong": False, "fwd90_tma_store": True}
    assert type(changes["fwd90_pingpong"]) is bool and type(changes["fwd90_stages"]) is int
    assert config.knobs("") == {}


def test_config_fits_shared_memory():
    for E, other, L, causal in itertools.product(range(8, 257, 8), (8, 64, 256), (1024, 4096), (False, True)):
        for Ev in (E, other):
            cfg = config.FlashConfig.for_problem(E, Ev, L, causal)
            kinds = ["fwd", "dkdv", "dq"] + (["fwd_sm90"] if config.sm90_forward_applies(E, Ev, 90, cfg) else []) + \
                (["bwd_sm90"] if config.sm90_backward_applies(E, Ev, 90, cfg) else [])
            for kind in kinds:
                assert config.smem_bytes(kind, cfg, E, Ev) <= 227 * 1024, (E, Ev, kind)


@pytest.mark.parametrize("BH, chunk_heads, key_blocks", [
    (256, 48, np.arange(1, 9)),      # causal, E = 128, L = 1024: query block m sees m + 1 key blocks
    (256, 1, np.arange(1, 9)),       # ... head-major
    (16, 3, np.arange(1, 129)),      # causal, L = 16384
    (40, 40, np.full(8, 8)),         # every key
    (3, 2, np.array([0, 2, 5, 1]))])  # fewer tiles than CTAs, a block that sees nothing
def test_forward_tiles_are_dealt_once_each_to_the_least_loaded(BH, chunk_heads, key_blocks):
    """The Hopper forward's tile schedule: every tile once, each CTA's in list order, and (causal) the
    busiest CTA within 1.1x the average where the kernel's round-robin deal gave it 1.14x or more."""

    grid = min(132, BH * len(key_blocks))
    schedule = launches.deal_tiles(key_blocks, BH, chunk_heads, grid)
    offsets, tiles = schedule[:grid + 1], schedule[grid + 1:]
    assert schedule.dtype == np.int32 and offsets[0] == 0 and offsets[-1] == len(tiles) == BH * len(key_blocks)
    assert sorted(tiles.tolist()) == list(range(len(tiles)))
    num_m = len(key_blocks)

    def work(t):  # tile_at's order: heads in chunks, query blocks from the last, heads innermost
        chunk, rem = divmod(t, chunk_heads * num_m)
        return key_blocks[num_m - 1 - rem // min(chunk_heads, BH - chunk * chunk_heads)] + 1

    loads = []
    for c in range(grid):
        mine = tiles[offsets[c]:offsets[c + 1]]
        assert (np.diff(mine) > 0).all()
        loads.append(sum(work(t) for t in mine))
    round_robin = [sum(work(t) for t in range(c, len(tiles), grid)) for c in range(grid)]
    assert max(loads) <= max(round_robin)
    if num_m >= 8 and key_blocks[0] != key_blocks[-1]:
        assert max(round_robin) >= 1.14 * np.mean(round_robin) and max(loads) <= 1.1 * np.mean(loads)


@pytest.mark.parametrize("BH, Hq, group, chunk_heads, num_m", [(256, 16, 1, 48, 8), (24, 8, 4, 5, 3), (3, 3, 3, 2, 4)])
def test_decoded_tiles_name_every_query_block_once(BH, Hq, group, chunk_heads, num_m):
    """decoded_tiles (the Hopper forward's schedule as its FWD90_SCHEDULE reads it): deal_tiles' offsets, padded to
    16 bytes, then each CTA's tiles as (batch, query head, kv head, query block), every (batch, head, block) once; a
    CTA's query blocks of one head from the last (tile_at's order within a chunk of heads)."""

    grid = min(132, BH * num_m)
    schedule = launches.deal_tiles(np.arange(1, num_m + 1), BH, chunk_heads, grid)
    dealt = launches.decoded_tiles(schedule, grid, BH, num_m, chunk_heads, Hq, group)
    start = -(-(grid + 1) // 4) * 4
    assert dealt.dtype == np.int32 and (dealt[:grid + 1] == schedule[:grid + 1]).all()
    assert not dealt[grid + 1:start].any()
    entries = dealt[start:].reshape(-1, 4)
    assert len(entries) == BH * num_m
    b, h, kvh, m = entries.T
    assert ((b >= 0) & (b < BH // Hq) & (h >= 0) & (h < Hq) & (m >= 0) & (m < num_m)).all()
    assert (kvh == h // group).all()
    assert len({(x, y, z) for x, y, z in zip(b, h, m)}) == BH * num_m
    tiles = schedule[grid + 1:]  # the query block and head each index stands for in tile_at's order
    chunk, rem = tiles // (chunk_heads * num_m), tiles % (chunk_heads * num_m)
    heads = np.minimum(chunk_heads, BH - chunk * chunk_heads)
    assert (m == num_m - 1 - rem // heads).all() and (b * Hq + h == chunk * chunk_heads + rem % heads).all()
    for c in range(grid):
        mine = entries[schedule[c]:schedule[c + 1]]
        for x, y in {(x, y) for x, y in mine[:, :2]}:
            blocks = mine[(mine[:, 0] == x) & (mine[:, 1] == y), 3]
            assert (np.diff(blocks) < 0).all()


def test_split_tiles_where_the_last_query_block_fills_one_warpgroup():
    """for_problem splits the last query block's key blocks over three warpgroups where that block holds 64 rows
    or fewer (L mod 192 in (0, 64]) and it measured faster (causal, or L <= 4096, without clusters: their CTAs
    walk in step), taking three warpgroups for short causal problems there; elsewhere nothing changes. The host's
    schedule counts a split tile's work as a warpgroup's share of its key blocks."""

    split = {(E, L, causal): config.FlashConfig.for_problem(E, E, L, causal)
             for E in (32, 64, 128) for L in (512, 1000, 1024, 2048, 4096, 16384) for causal in (False, True)}
    for (E, L, causal), cfg in split.items():
        want = E <= 64 and -(-L // 64) % 3 == 1 and (causal or L <= 4096)
        assert cfg.fwd90_split_last == want, (E, L, causal)
        if want:
            assert cfg.fwd90_warpgroups == 3 and cfg.fwd90_cluster == 1, (E, L, causal)
            assert cfg.fwd90_stages == (3 if causal or L < 2048 or E <= 32 else 2), (E, L, causal)
    assert split[64, 16384, False].fwd90_cluster == 2 and split[64, 512, True].fwd90_warpgroups == 2
    pr = build(Case(hq=2, L=1024, S=1024, E=64, causal="upper_left"), np, np.random.default_rng(0))
    assert launches.tile_work(pr, 6, 192, 128).tolist() == [2, 3, 5, 6, 8, 8]
    assert launches.tile_work(pr, 6, 192, 128, split=3).tolist() == [2, 3, 5, 6, 8, 3]
    pr = build(Case(hq=2, L=1100, S=1024, E=64), np, np.random.default_rng(0))  # (1100 = 5 x 192 + 140: no split)
    assert launches.tile_work(pr, 6, 192, 128, split=3).tolist() == [8] * 6


def test_harness_judges_the_math_backend_on_cpu(rng):
    """The GPU harness itself, run on the CPU: MATH in bf16 must pass it, a perturbed result must not."""
    pytest.importorskip("torch")
    pytest.importorskip("ml_dtypes")
    from cusdpa.backends import math as math_backend

    case = Case(dtype="bfloat16", L=9, S=13, E=16, hq=4, hkv=2, causal="lower_right", dropout_p=0.2)
    assert run_case(case, math_backend.IMPL, np, rng) == []
    varlen = Case(dtype="float16", hq=2, hkv=1, E=8, varlen=((3, 5), (0, 2), (6, 4)), causal="upper_left")
    assert run_case(varlen, math_backend.IMPL, np, rng) == []

    class Off:  # MATH with a small error in one output element
        @staticmethod
        def forward(pr, out=None, lse=None):
            o, l = math_backend.IMPL.forward(pr, out, lse)
            o[0, 0, 1, 2] += 0.5
            return o, l

        backward = math_backend.IMPL.backward

    failures = run_case(case, Off, np, rng, grads=False)
    assert len(failures) == 1 and "out: max error" in failures[0]


# ---- GPU ---------------------------------------------------------------------------------------------------

SIZES = [(1, 17), (17, 1), (97, 1025), (1025, 97), (128, 128), (1025, 1025), (17, 97)]
VARIANTS = [None, "upper_left", "lower_right"]


def _gpu_check(case, rng, grads=True):
    import cupy

    failures = run_case(case, flash.IMPL, cupy, rng, grads=grads, mask_grad=False)  # dmask: the test below
    assert not failures, "\n".join(failures)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("E", [32, 40, 64, 72, 96, 128, 160, 192, 224, 256])
@pytest.mark.parametrize("n", range(len(SIZES)))
def test_sizes_and_head_dims(dtype, E, n, rng):
    L, S = SIZES[n]
    _gpu_check(Case(dtype=dtype, batch=(1,), hq=2, hkv=2, L=L, S=S, E=E, causal=VARIANTS[(n + E) % 3]), rng)


FEATURES = {
    "gqa": Case(hq=8, hkv=2, L=130, S=200, E=64, causal="upper_left"),
    "mqa": Case(dtype="float16", hq=6, hkv=1, L=77, S=77, E=128),
    "window": Case(L=300, S=300, E=64, window=(37, 11)),
    "window_lower_right": Case(dtype="float16", L=150, S=333, E=72, window=(64, 0), causal="lower_right"),
    "causal_short_keys": Case(L=200, S=70, E=64, causal="lower_right"),
    "dropout": Case(L=150, S=140, E=64, dropout_p=0.3, causal="upper_left"),
    "dropout_gqa_fp16": Case(dtype="float16", hq=4, hkv=2, L=65, S=190, E=128, dropout_p=0.1),
    "ev_differs": Case(L=100, S=120, E=40, Ev=128),
    "ev_smaller": Case(dtype="float16", L=100, S=120, E=256, Ev=64, causal="lower_right"),
    "swizzles_differ": Case(L=100, S=120, E=96, Ev=64, causal="lower_right"),  # Hopper: 64- and 128-byte
    "batch_dims": Case(batch=(2, 3), hq=2, hkv=1, L=33, S=65, E=64),
    "kv_batch_broadcast": Case(batch=(3,), L=40, S=50, E=64, kv_batch_broadcast=True),
    "strided": Case(L=91, S=77, E=128, transposed=True, causal="upper_left"),
    "varlen": Case(hq=4, hkv=2, E=64, varlen=((100, 130), (0, 5), (257, 64), (3, 0), (64, 64)),
                   causal="lower_right"),
    "varlen_window_dropout": Case(dtype="float16", E=128, varlen=((130, 130), (47, 200)), window=(20, 5),
                                  dropout_p=0.2),
    # Hopper's backward above E = 128 (flash_bwd_sm90_wide.cu) with a GQA group, packed sequences and a window
    "wide_gqa_varlen_window": Case(hq=4, hkv=2, E=192, Ev=128, varlen=((130, 150), (65, 0), (200, 64)),
                                   window=(40, 10)),
    # ... with head dims its warpgroups split unevenly (96 + 64 and 128 + 96 columns), dropout
    "wide_uneven_parts": Case(hq=4, hkv=1, L=150, S=170, E=160, Ev=224, dropout_p=0.1, causal="upper_left"),
    "empty_queries": Case(L=0, S=40, E=64),
    "empty_keys": Case(L=40, S=0, E=64),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(FEATURES))
def test_features(name, rng):
    _gpu_check(FEATURES[name], rng)


# attn_mask on the Hopper forward: the contract's broadcast shapes, each mask kind and float dtype, rows
# whose keys come in an odd count (the kernel reads keys in pairs: an even-length copy) or are all masked.
MASKED = {
    "bool_key_padding": Case(batch=(3,), hq=4, L=130, S=200, E=64, mask="bool", mask_shape=(3, 1, 1, 200)),
    "bool_2d_causal_gqa_dropout": Case(hq=4, hkv=2, L=150, S=150, E=96, causal="lower_right", dropout_p=0.2,
                                       mask="bool", mask_shape=(150, 150)),
    "bool_batch_rows": Case(batch=(2,), hq=3, hkv=1, L=70, S=300, E=128, mask="bool", mask_shape=(2, 1, 70, 300)),
    "bool_wide": Case(hq=2, L=100, S=140, E=192, Ev=128, causal="upper_left", mask="bool",
                      mask_shape=(2, 100, 140)),
    "bool_short_keys_e32": Case(batch=(2,), hq=2, L=200, S=37, E=32, mask="bool", mask_shape=(2, 2, 200, 37)),
    "float32_heads_odd_keys": Case(hq=3, hkv=3, L=100, S=91, E=128, mask="float", mask_shape=(1, 3, 100, 91),
                                   mask_dtype="float32"),
    "float_full_window": Case(dtype="float16", batch=(2,), hq=2, L=120, S=130, E=256, window=(30, 10),
                              mask="float"),
    "bfloat16_mask_ev_differs": Case(hq=2, L=90, S=200, E=192, Ev=128, causal="upper_left", mask="float",
                                     mask_shape=(2, 90, 200), mask_dtype="bfloat16"),
    "float16_mask_bf16_inputs": Case(batch=(2, 2), hq=2, L=64, S=64, E=32, mask="float",
                                     mask_shape=(2, 1, 1, 64, 64), mask_dtype="float16"),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(MASKED))
def test_attn_mask_on_the_hopper_kernels(name, rng):
    """Forward and backward (a float mask's values without its gradient: the test below)."""
    _gpu_check(MASKED[name], rng)


MASK_GRADS = {
    "full": Case(batch=(2,), hq=3, hkv=3, L=130, S=200, E=64, mask="float", mask_shape=(2, 3, 130, 200)),
    "heads_causal": Case(batch=(3,), hq=2, L=150, S=150, E=128, causal="lower_right", mask="float",
                         mask_shape=(1, 2, 150, 150), mask_dtype="float32"),
    "key_padding_gqa_dropout": Case(dtype="float16", batch=(2,), hq=4, hkv=2, L=100, S=170, E=96, dropout_p=0.2,
                                    mask="float", mask_shape=(2, 1, 1, 170)),
    "2d_short_keys_e32": Case(hq=2, L=200, S=37, E=32, mask="float", mask_shape=(200, 37), mask_dtype="bfloat16"),
    "window_two_batch_dims": Case(batch=(2, 2), hq=2, L=90, S=90, E=64, window=(20, 5), mask="float",
                                  mask_shape=(2, 1, 1, 90, 90)),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(MASK_GRADS))
def test_float_mask_gradient_on_the_hopper_backward(name, rng):
    """FlashConfig.bwd90_mask_grad: a float attn_mask's gradient from the Hopper backward (dS stored for every
    pair of a step, summed over the mask's broadcast dims), judged against the reference as EFFICIENT's is;
    through dispatch, FLASH is chosen for it, and the wide kernel (E > 128) leaves it to EFFICIENT."""
    import dataclasses

    import cupy

    from cusdpa import dispatch

    failures = run_case(MASK_GRADS[name], flash.IMPL, cupy, rng, grads=True, mask_grad=True)
    assert not failures, "\n".join(failures)
    assert dispatch.select(build(MASK_GRADS[name], cupy, rng), need_grad=True).backend is dispatch.Backend.FLASH
    wide = build(dataclasses.replace(MASK_GRADS[name], E=192, Ev=128), cupy, rng)
    assert flash.IMPL.not_supported_reasons(wide, True) and not flash.IMPL.not_supported_reasons(wide, True, False)


ALIBI = {
    "head_causal_lower_right": Case(L=150, S=333, E=64, causal="lower_right", alibi="head"),
    "batch_gqa_e128": Case(hq=8, hkv=2, L=130, S=200, E=128, alibi="batch"),
    "bool_mask_window": Case(L=300, S=300, E=64, window=(37, 11), mask="bool", alibi="head"),
    "float_mask_e96": Case(dtype="float16", L=77, S=90, E=96, mask="float", mask_shape=(2, 1, 77, 90),
                           alibi="batch"),
    "varlen_e256": Case(hq=4, hkv=2, E=256, varlen=((5, 70), (130, 40), (64, 64)), causal="lower_right",
                        alibi="batch"),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(ALIBI))
def test_alibi_on_the_hopper_kernels(name, rng):
    """ALiBi (FlashAttention's bias, bottom-right aligned) forward and backward on the Hopper kernels."""
    _gpu_check(ALIBI[name], rng)


SOFTCAP = {
    "causal_e128": Case(L=300, S=300, E=128, causal="upper_left", softcap=30.0),
    "gqa_alibi_bool_e64": Case(hq=8, hkv=2, L=130, S=200, E=64, softcap=5.0, alibi="head", mask="bool"),
    "float_mask_e96": Case(dtype="float16", L=77, S=90, E=96, softcap=2.0, mask="float",
                           mask_shape=(2, 1, 77, 90)),
    "dropout_window": Case(L=150, S=140, E=64, dropout_p=0.3, window=(40, 0), softcap=10.0),
    "varlen_e256": Case(hq=4, hkv=2, E=256, varlen=((5, 70), (130, 40)), causal="lower_right", softcap=20.0),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(SOFTCAP))
def test_softcap_on_the_hopper_kernels(name, rng):
    """Logit soft-capping (softcap * tanh(score / softcap), the scaled score's first transformation) forward
    and backward on the Hopper kernels."""
    _gpu_check(SOFTCAP[name], rng)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["bool_rows", "bool_padding", "bool_heads", "float32_rows", "float16_heads"])
@pytest.mark.parametrize("causal", [False, True])
def test_mask_summary_kernel_matches_numpy(kind, causal, rng):
    """kernels_cuda/mask_summary.cu against its definition in NumPy: the keys some query row attends (mask and
    visibility; with broadcast rows the mask's row alone) and, per 64 x 48 tile, 0 = nothing attended,
    2 = every visible pair attended (bool), else 1, plus 4 where a key of the tile is attended by no row of it
    and 8 where a float mask holds -inf at a visible pair of it."""
    import cupy

    from cusdpa import problem

    B, H, L, S, bm, bn = 2, 3, 150, 130, 64, 48
    dtype, shape = kind.split("_")
    mshape = {"rows": (B, 1, L, S), "padding": (B, 1, 1, S), "heads": (1, H, L, S)}[shape]
    attend = rng.random(mshape) < 0.7
    attend[0, ..., 100:] = False                      # keys nobody attends: padding
    attend[..., :, 10:20] = attend[..., :1, 10:20]    # columns alike in every row (whole tiles masked)
    mask = attend if dtype == "bool" else np.where(attend, rng.standard_normal(mshape), -np.inf).astype(dtype)
    if dtype != "bool":
        mask[0, ..., 0, 5] = np.nan                   # NaN attends: it propagates
        attend = attend | np.isnan(mask.astype(np.float32))
    q, k, v = (cupy.asarray(rng.standard_normal((B, H, n, 64)), dtype=cupy.float16) for n in (L, S, S))
    pr = problem.from_dense(q, k, v, cupy.asarray(mask), problem.Options(is_causal=causal, causal_variant="lower_right"))
    array, strides = launches.mask_operand(pr)
    summary = launches.MaskSummary.of(pr, strides, bm, bn)

    def run(skip):
        slots, first = launches.mask_values(pr, array, summary, skip)
        launches.run(first, launches.values(**slots),
                     cupy.cuda.get_current_stream().ptr, launches.device(pr))
        return slots["seen"].reshape(summary.batches, summary.pitch), slots["blocks"]

    seen, blocks = run(skip=True)
    _, sk_b, sk_h = summary.seen_args()
    _, bs_b, bs_h, bs_m = summary.block_args(S)
    rows = attend.shape[-2]
    i, j = np.arange(rows)[:, None], np.arange(S)[None, :]
    visible = (j <= i + S - L) if causal and rows > 1 else np.ones((rows, S), bool)
    want_seen = (attend & visible).any(-2).reshape(-1, S)
    pitch = seen.shape[1]
    assert pitch % 16 == 0 and cupy.asnumpy(seen[:, S:]).all()  # the padding reads as seen
    assert cupy.asnumpy(seen[:, :S]).astype(bool).tolist() == want_seen.tolist()
    bmr = bm if rows > 1 else 1
    n_m, n_n = -(-rows // bmr), -(-S // bn)
    count, taken = summary.batches * n_m * n_n, summary.taken_at(S)
    assert taken >= count and blocks.size == taken + 8
    assert cupy.asnumpy(blocks[taken:]).tolist() == [0] * 8  # the forward's tile counter, zeroed
    got = cupy.asnumpy(blocks[:count]).reshape(-1, n_m, n_n)
    every = cupy.asnumpy(run(skip=False)[1][:count]).reshape(-1, n_m, n_n)
    a, h = (attend & visible).reshape(-1, rows, S), (visible & ~attend).reshape(-1, rows, S)
    for x, (m, n) in itertools.product(range(a.shape[0]), itertools.product(range(n_m), range(n_n))):
        tile = (slice(m * bmr, (m + 1) * bmr), slice(n * bn, (n + 1) * bn))
        want = 0 if not a[x][tile].any() else 2 if dtype == "bool" and not h[x][tile].any() else 1
        want |= 0 if a[x][tile].any(axis=0).all() else 4  # a key no row of the tile attends
        want |= 8 if dtype != "bool" and h[x][tile].any() else 0  # a float mask's -inf at a visible pair
        assert got[x, m, n] == want, (x, m, n)
        assert every[x, m, n] == want & 12 | 1, (x, m, n)  # skip off: every block read, holes and -inf kept
    Bm, Hm = mshape[0], mshape[1]
    assert (int(sk_b), int(sk_h)) == ((Hm * pitch if Bm > 1 else 0), (pitch if Hm > 1 else 0))
    assert (int(bs_b), int(bs_h), int(bs_m)) == ((Hm * n_m * n_n if Bm > 1 else 0), (n_m * n_n if Hm > 1 else 0),
                                                  (n_n if rows > 1 else 0))


def _block_masks(rng):
    """Masks whose key blocks (128 wide) are wholly masked, wholly visible or mixed, for the block summary."""
    padding = np.ones((2, 1, 1, 700), bool)
    padding[0, ..., 300:] = False                     # batch 0: key blocks 3.. empty, block 2 partial
    sparse = np.kron(rng.random((1, 1, 6, 6)) < 0.15, np.ones((128, 128), bool))[..., :700, :700]
    sparse[..., 5, :] = True                          # a partial block row
    bias = np.where(np.kron(rng.random((2, 1, 6, 6)) < 0.5, np.ones((128, 128), bool))[..., :700, :700],
                    rng.standard_normal((2, 1, 700, 700)), -np.inf)
    return {"key_padding": padding, "ninety_percent_empty": sparse, "float_blocks": bias.astype(np.float32)}


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["key_padding", "ninety_percent_empty", "float_blocks"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("variant", ["forward", "steps", "steps_wide"])
def test_attn_mask_block_summary_skips_blocks(name, causal, variant, rng, monkeypatch):
    """The Hopper forward with the mask's block summary (FlashConfig.fwd90_mask_blocks, on by default): empty
    key blocks skipped by producer and consumers, fully visible ones read no mask; the same results as the
    reference, and the backward's too. ``forward``: the backward visits every step (FlashConfig.bwd90_mask_blocks
    off); ``steps``: it skips the steps the summary shows empty (on, the default), in flash_bwd_sm90.cu (E = 64)
    and flash_bwd_sm90_wide.cu (E = 256)."""
    import dataclasses

    import cupy

    from cusdpa import problem
    from cusdpa.verify.harness import run_problem

    real = launches.config
    steps = variant != "forward"
    monkeypatch.setattr(launches, "config", lambda pr: dataclasses.replace(real(pr), bwd90_mask_blocks=steps))
    E = 256 if variant == "steps_wide" else 64
    mask = _block_masks(rng)[name]
    q, k, v = (cupy.asarray(rng.standard_normal((2, 4, 700, E)), dtype=cupy.float16) for _ in range(3))
    pr = problem.from_dense(q, k, v, cupy.asarray(mask), problem.Options(is_causal=causal))
    failures = run_problem(pr, flash.IMPL, rng, grads=mask.dtype == bool)
    assert not failures, "\n".join(failures)


@pytest.mark.gpu
def test_block_diagonal_mask_visits_one_key_block_per_tile(rng):
    """A mask whose 128-query blocks each attend one 128-key block (a block-diagonal document mask), over
    enough tiles that every CTA of the persistent forward walks a dozen one-block tiles: the producer's
    lanes once drifted a barrier phase apart there and hung (H200). Judged against the same attention
    computed block by block (each query block against its own keys, unmasked), a wrapped BlockMask and the
    plain array alike. The CTAs take these tiles from a counter beside the summary (TileQueue): the wrapped
    mask's second call reuses it, so the last CTA of each call must have set it back to zero."""
    import cupy

    import cusdpa

    B, H, L, E, n = 4, 16, 4096, 128, 32
    q, k, v = (cupy.asarray(rng.standard_normal((B, H, L, E)), dtype=cupy.float16) for _ in range(3))
    diagonal = cupy.kron(cupy.eye(n, dtype=cupy.int8), cupy.ones((128, 128), dtype=cupy.int8)).astype(bool)
    mask = cupy.ascontiguousarray(cupy.broadcast_to(diagonal, (B, 1, L, L)))
    blocks = [x.reshape(B, H, n, 128, E) for x in (q, k, v)]
    with cusdpa.sdpa_kernel(cusdpa.Backend.FLASH):
        want = cusdpa.scaled_dot_product_attention(*blocks).reshape(B, H, L, E)
        wrapped = cusdpa.BlockMask(mask)
        for m in (mask, wrapped, wrapped):
            got = cusdpa.scaled_dot_product_attention(q, k, v, m)
            assert float(cupy.abs(got.astype(cupy.float32) - want.astype(cupy.float32)).max()) < 2e-3
    ((summary, _, _), (_, buffer)), = wrapped.summaries.items()
    taken = summary.taken_at(L)
    assert cupy.asnumpy(buffer[taken:]).tolist() == [0] * 8


@pytest.mark.gpu
def test_a_block_mask_is_summarised_once(rng):
    """cusdpa.BlockMask on CuPy arrays: one summary for every call it is passed to, forward and backward,
    with results bit-identical to the plain array's (whose summary each call makes afresh)."""
    import cupy

    import cusdpa

    mask = cupy.asarray(_block_masks(rng)["ninety_percent_empty"])
    q, k, v = (cupy.asarray(rng.standard_normal((2, 4, 700, 64)), dtype=cupy.float16) for _ in range(3))
    dout = cupy.asarray(rng.standard_normal((2, 4, 700, 64)), dtype=cupy.float16)
    wrapped = cusdpa.BlockMask(mask)
    with cusdpa.sdpa_kernel(cusdpa.Backend.FLASH):
        out, vjp = cusdpa.attention_vjp(q, k, v, mask, deterministic=True)
        grads = vjp(dout)
        for _ in range(2):
            got, got_vjp = cusdpa.attention_vjp(q, k, v, wrapped, deterministic=True)
            assert cupy.array_equal(got, out)
            assert all(cupy.array_equal(g, w) for g, w in zip(got_vjp(dout), grads))
    assert len(wrapped.summaries) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(MASKED))
def test_attn_mask_cases_without_the_block_summary(name, rng, monkeypatch):
    """The Hopper forward reading every mask element (FlashConfig.fwd90_mask_blocks off)."""
    import dataclasses


    real = launches.config
    monkeypatch.setattr(launches, "config", lambda pr: dataclasses.replace(real(pr), fwd90_mask_blocks=False))
    _gpu_check(MASKED[name], rng, grads=False)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["gqa", "window", "dropout", "varlen"])
def test_hopper_forward_with_a_cta_per_tile(name, rng, monkeypatch):
    """FlashConfig.fwd90_persistent off: a CTA per tile instead of one per SM walking its tiles."""
    import dataclasses


    real = launches.config
    monkeypatch.setattr(launches, "config", lambda pr: dataclasses.replace(real(pr), fwd90_persistent=False))
    _gpu_check(FEATURES[name], rng, grads=False)


@pytest.mark.gpu
@pytest.mark.parametrize("queue", [True, False])
@pytest.mark.parametrize("name", ["varlen", "varlen_window_dropout", "many_sequences"])
def test_packed_batch_tiles_from_the_queue(name, queue, rng, monkeypatch):
    """FlashConfig.fwd90_queue_varlen: a packed batch's tiles taken by the persistent forward's CTAs as they
    finish them (TileQueue, with a zeroed counter of the call's own), or dealt round-robin, judged against the
    reference; many_sequences deals ~1600 tiles of 40 sequences from 1 to 600 queries, so most are taken from
    the queue."""
    import dataclasses


    real = launches.config
    monkeypatch.setattr(launches, "config", lambda pr: dataclasses.replace(real(pr), fwd90_queue_varlen=queue))
    lengths = np.arange(40) * 37 % 600 + 1
    many = Case(hq=8, hkv=2, E=64, varlen=tuple((int(n), int(n) + 7) for n in lengths), causal="lower_right")
    _gpu_check(many if name == "many_sequences" else FEATURES[name], rng, grads=False)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["gqa", "mqa", "dropout", "strided", "varlen", "causal_short_keys"])
def test_mma_sync_kernels_where_wgmma_would_run(name, rng, monkeypatch):
    """On Hopper the forward and dK/dV take the wgmma kernels; the portable mma.sync ones must stay right too."""
    import dataclasses


    monkeypatch.setattr(launches, "config", lambda pr: dataclasses.replace(
        config.FlashConfig.for_head_dims(pr.E, pr.Ev), use_wgmma=False, use_wgmma_bwd=False))
    _gpu_check(FEATURES[name], rng)


@pytest.mark.gpu
@pytest.mark.parametrize("schedule", [True, False])
@pytest.mark.parametrize("name", ["gqa", "window", "causal_short_keys", "dropout", "swizzles_differ", "ev_smaller"])
def test_persistent_forward_runs_many_tiles_per_cta(name, schedule, rng, monkeypatch):
    """A device of two SMs: each CTA of the persistent Hopper forward takes many tiles in turn, dealt by the
    host's schedule or round-robin."""
    import dataclasses


    monkeypatch.setattr(sources, "multiprocessors", lambda device: 2)
    monkeypatch.setattr(launches, "config", lambda pr: dataclasses.replace(
        config.FlashConfig.for_problem(pr.E, pr.Ev, pr.L, pr.causal), fwd90_schedule=schedule))
    _gpu_check(FEATURES[name], rng, grads=False)


@pytest.mark.parametrize("E, Ev, causal, stored, stages", [
    (128, 128, False, True, 2), (128, 128, True, True, 2),  # causal's third K/V stage given up for the buffer
    (64, 64, True, True, 3), (160, 224, True, True, 2), (96, 64, False, True, 2),
    (192, 192, False, False, 2), (256, 256, False, False, 2)])  # no room beside two stages: register stores
def test_the_tma_store_takes_two_stages_or_stays_off_where_it_does_not_fit(E, Ev, causal, stored, stages, rng,
                                                                            monkeypatch):
    from cusdpa import problem

    monkeypatch.setattr(launches, "config", lambda pr: dataclasses.replace(
        config.FlashConfig.for_problem(pr.E, pr.Ev, pr.L, pr.causal), fwd90_tma_store=True))
    q, k = (rng.standard_normal((1, 2, 1024, E)).astype(np.float16) for _ in range(2))
    v = rng.standard_normal((1, 2, 1024, Ev)).astype(np.float16)
    pr = problem.from_dense(q, k, v, None, problem.Options(is_causal=causal))
    cfg = launches.sm90_forward_config(pr)
    assert (cfg.fwd90_tma_store, cfg.fwd90_stages) == (stored, stages)
    assert config.smem_bytes("fwd_sm90", cfg, E, Ev) <= config.MAX_SMEM
    packed = dataclasses.replace(pr, varlen=object())  # a packed batch stores from registers
    assert not launches.sm90_forward_config(packed).fwd90_tma_store


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["gqa", "mqa", "window", "dropout_gqa_fp16", "swizzles_differ", "batch_dims", "strided",
                                  "varlen", "empty_keys", "wide_uneven_parts", "bool_key_padding",
                                  "float32_heads_odd_keys"])
def test_hopper_forward_stores_o_with_tma(name, rng, monkeypatch):
    """FlashConfig.fwd90_tma_store: each consumer warpgroup stages O in shared memory and one thread stores it
    with TMA (a packed batch keeps its register stores). The same arithmetic as the register stores, so the
    same bits, judged against the reference too; on a device of two SMs, so that each warpgroup writes its
    staging buffer again tile after tile while earlier stores may still read it."""
    import cupy

    from cusdpa.verify.harness import run_problem

    monkeypatch.setattr(sources, "multiprocessors", lambda device: 2)
    pr = build({**FEATURES, **MASKED}[name], cupy, rng)
    real = launches.config
    stored = {}
    for on in (False, True):
        monkeypatch.setattr(launches, "config", lambda pr, on=on: dataclasses.replace(real(pr), fwd90_tma_store=on))
        stored[on] = flash.IMPL.forward(pr)
    want, got = stored[False], stored[True]
    assert all(cupy.array_equal(g, w, equal_nan=True) for g, w in zip(got, want))
    failures = run_problem(pr, flash.IMPL, rng, grads=False)
    assert not failures, "\n".join(failures)


# Cases of idle warpgroups skipping their tiles: query lengths (L, or a packed sequence's) that leave the last
# query block's last warpgroup without rows in 128- and in 192-row tiles alike (L mod 128 in (0, 64], L mod 192 in
# (0, 128]: 257, 300), tiles of one key block and of several, every kind of tile deal (static, a mask's queue, a
# packed batch's).
IDLE_CASES = {
    "causal_gqa": (Case(hq=8, hkv=2, L=300, S=300, E=64, causal="upper_left"), (2, 3)),
    "window": (FEATURES["window"], (2, 3)),
    "dropout_lower_right": (Case(L=257, S=200, E=64, dropout_p=0.3, causal="lower_right"), (2, 3)),
    "swizzles_differ": (Case(L=257, S=120, E=96, Ev=64, causal="lower_right"), (2,)),
    "varlen": (FEATURES["varlen"], (2, 3)),
    "empty_keys": (FEATURES["empty_keys"], (2,)),  # the tile's early exit comes before the idle check
    "bool_key_padding": (Case(batch=(3,), hq=4, L=257, S=200, E=64, mask="bool", mask_shape=(3, 1, 1, 200)), (2,)),
    "float32_mask_odd_keys": (Case(hq=3, hkv=3, L=257, S=91, E=128, mask="float", mask_shape=(1, 3, 257, 91),
                                   mask_dtype="float32"), (2,)),
    "wide_uneven_parts": (Case(hq=4, hkv=1, L=257, S=170, E=160, Ev=224, dropout_p=0.1, causal="upper_left"), (2,)),
}


def _knob_keeps_the_bits(pr, rng, monkeypatch, knob: str, values: tuple, **fixed) -> None:
    """The Hopper forward of ``pr`` with FlashConfig's ``knob`` at each of ``values`` (each taken:
    sm90_forward_config keeps it) and the ``fixed`` fields: the same out and lse, bit for bit, and the reference
    judges them."""
    import cupy

    from cusdpa.verify.harness import run_problem

    real = launches.config
    results = []
    for value in values:
        monkeypatch.setattr(launches, "config", lambda pr, value=value: dataclasses.replace(
            real(pr), **{knob: value}, **fixed).fitted(pr.E, pr.Ev))
        assert getattr(launches.sm90_forward_config(pr), knob) == value, (knob, value)
        results.append(flash.IMPL.forward(pr))
    assert all(cupy.array_equal(g, w, equal_nan=True) for g, w in zip(*results))
    failures = run_problem(pr, flash.IMPL, rng, grads=False)
    assert not failures, "\n".join(failures)


@pytest.mark.gpu
@pytest.mark.parametrize("name,warpgroups", [(n, w) for n, (c, ws) in IDLE_CASES.items() for w in ws])
def test_idle_warpgroups_skipping_keeps_the_bits(name, warpgroups, rng, monkeypatch):
    """fwd90_skip_idle (a warpgroup whose rows all lie past the queries computes nothing, only keeps the
    pipeline's protocol) gives the same out and lse, bit for bit, off and on, and the reference judges them too.
    On a device of two SMs, so that each CTA goes on to tiles after such a walk."""
    import cupy

    monkeypatch.setattr(sources, "multiprocessors", lambda device: 2)
    case, _ = IDLE_CASES[name]
    _knob_keeps_the_bits(build(case, cupy, rng), rng, monkeypatch, "fwd90_skip_idle", (False, True),
                         fwd90_warpgroups=warpgroups)


def test_idle_cases_leave_a_warpgroup_idle():
    """Every case of the skipping test above (but the one without keys) has a query block whose last warpgroup has no
    rows, in each tile size it runs, and runs on the Hopper forward's head dims."""
    for name, (case, warpgroups) in IDLE_CASES.items():
        assert config.sm90_forward_applies(case.E, case.Ev or case.E, 90, config.FlashConfig()), name
        lengths = [lq for lq, _ in case.varlen] if case.varlen else [case.L]
        for w in warpgroups:
            assert name == "empty_keys" or any(0 < lq % (64 * w) <= 64 * (w - 1) for lq in lengths), (name, w)


# fwd90_split_last: problems with a query block whose rows fill the first warpgroup only (L mod 64 w in (0, 64]),
# in the tiles (consumer warpgroups) that leave one: causal both ways, a window, dropout, GQA, a packed batch,
# more key blocks than warpgroups and fewer (a part with no block), every tile split (L <= 64, so that a CTA hands
# over tile after tile), ALiBi and soft-capping (scores in natural units), 64-byte rows, no keys at all
SPLIT_CASES = {
    "causal_gqa": (Case(hq=8, hkv=2, L=400, S=400, E=64, causal="upper_left"), (2, 3)),
    "dropout_lower_right": (Case(L=400, S=333, E=64, dropout_p=0.3, causal="lower_right"), (2, 3)),
    "window": (Case(L=400, S=400, E=64, window=(37, 11)), (2, 3)),
    "nine_key_blocks": (Case(batch=(2,), hq=2, L=1000, S=1100, E=64), (3,)),
    "one_key_block": (Case(L=400, S=100, E=64), (2, 3)),
    "every_tile_split": (Case(batch=(3,), hq=4, L=50, S=700, E=64, dropout_p=0.1), (2, 3)),
    "varlen": (FEATURES["varlen"], (2, 3)),
    "softcap_alibi": (Case(hq=4, L=400, S=300, E=128, softcap=30.0, alibi="head"), (2,)),
    "e32_float16": (Case(dtype="float16", L=400, S=520, E=32), (3,)),
    "e96_64": (Case(L=257, S=300, E=96, Ev=64, causal="lower_right"), (2,)),
    "empty_keys": (FEATURES["empty_keys"], (2, 3)),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name,warpgroups", [(n, w) for n, (c, ws) in SPLIT_CASES.items() for w in ws])
def test_split_tiles_match_the_reference(name, warpgroups, rng, monkeypatch):
    """fwd90_split_last (a tile whose rows fill the first warpgroup computed by every warpgroup on its share of the
    key blocks, the parts merged through shared memory): out and lse judged by the reference. On a device of two
    SMs, so that each CTA goes on to tiles after a split one."""
    import cupy

    from cusdpa.verify.harness import run_problem

    monkeypatch.setattr(sources, "multiprocessors", lambda device: 2)
    real = launches.config
    monkeypatch.setattr(launches, "config", lambda pr: dataclasses.replace(
        real(pr), fwd90_split_last=True, fwd90_cluster=1, fwd90_warpgroups=warpgroups).fitted(pr.E, pr.Ev))
    pr = build(SPLIT_CASES[name][0], cupy, rng)
    assert launches.sm90_forward_config(pr).fwd90_split_last
    failures = run_problem(pr, flash.IMPL, rng, grads=False)
    assert not failures, "\n".join(failures)


def test_split_cases_split_a_tile():
    """Every case of the test above (but the one without keys) has a query block whose rows fill only the first
    warpgroup, in each tile size it runs; the hand-over buffer fits beside the tiles in every such configuration."""
    for name, (case, warpgroups) in SPLIT_CASES.items():
        lengths = [lq for lq, _ in case.varlen] if case.varlen else [case.L]
        for w in warpgroups:
            assert name == "empty_keys" or any(0 < lq % (64 * w) <= 64 for lq in lengths), (name, w)
            Ev = case.Ev or case.E
            cfg = dataclasses.replace(config.FlashConfig.for_problem(case.E, Ev, 4096, False), fwd90_split_last=True,
                                      fwd90_cluster=1, fwd90_warpgroups=w).fitted(case.E, Ev)
            assert cfg.fwd90_split_last, (name, w)


# fwd90_wg_blocks: problems where a warpgroup's rows see none of its tile's last key blocks, in the tiles
# (consumer warpgroups, key block) that leave such blocks: causal both ways, a window, dropout, a packed batch
# (a queue's tiles), a bool mask (its summary's walk), GQA, idle warpgroups beside it, head dims on 64-byte rows
WG_BLOCKS_CASES = {
    # (three warpgroups on 64-key blocks: the first walks two blocks, one of them in the stage its last P V reads)
    "causal_gqa": (Case(hq=8, hkv=2, L=600, S=600, E=64, causal="upper_left"), ((3, 128), (2, 64), (3, 64))),
    "lower_right_dropout": (Case(L=450, S=520, E=64, dropout_p=0.3, causal="lower_right"), ((3, 128), (2, 64))),
    "window": (Case(L=500, S=500, E=64, window=(100, 30)), ((3, 128), (2, 64))),
    "varlen": (Case(hq=4, hkv=2, E=64, varlen=((400, 400), (0, 5), (257, 300), (130, 0)), causal="lower_right"),
               ((3, 128), (2, 64), (3, 64))),
    "bool_mask_causal": (Case(batch=(2,), hq=2, L=450, S=450, E=64, causal="upper_left", mask="bool",
                              mask_shape=(2, 1, 1, 450)), ((2, 64),)),
    "swizzles_differ": (Case(L=400, S=400, E=96, Ev=64, causal="upper_left"), ((2, 64),)),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name,tiles", [(n, t) for n, (c, ts) in WG_BLOCKS_CASES.items() for t in ts])
def test_warpgroups_stopping_at_their_own_blocks_keep_the_bits(name, tiles, rng, monkeypatch):
    """fwd90_wg_blocks (each consumer warpgroup stops at its own rows' last key block and walks the rest) gives
    the same out and lse, bit for bit, off and on, with idle warpgroups skipping too, and the reference judges
    them. On a device of two SMs, so that each CTA goes on to tiles after such a walk."""
    import cupy

    monkeypatch.setattr(sources, "multiprocessors", lambda device: 2)
    case, _ = WG_BLOCKS_CASES[name]
    warpgroups, block_n = tiles
    _knob_keeps_the_bits(build(case, cupy, rng), rng, monkeypatch, "fwd90_wg_blocks", (False, True),
                         fwd90_skip_idle=True, fwd90_warpgroups=warpgroups, fwd90_block_n=block_n)


def test_wg_blocks_cases_leave_a_warpgroup_blocks_it_does_not_see():
    """In every case of the test above, for each tile size it runs, some warpgroup's rows see none of the last
    key block of their tile (else the walk goes untested)."""
    for name, (case, tiles) in WG_BLOCKS_CASES.items():
        lengths = [(lq, lk) for lq, lk in case.varlen] if case.varlen else [(case.L, case.S)]
        for warpgroups, block_n in tiles:
            def unseen(L, S):
                shift = S - L if case.causal == "lower_right" else 0
                right = case.window[1] if case.window else 0
                for m0 in range(0, L, 64 * warpgroups):
                    last = min(m0 + 64 * warpgroups, L) - 1 + shift + right  # the tile's last key seen
                    for mw in range(m0, min(m0 + 64 * warpgroups, L), 64):
                        own = min(mw + 64, L) - 1 + shift + right
                        if own // block_n < min(last, S - 1) // block_n:
                            return True
                return False
            assert any(unseen(L, S) for L, S in lengths), (name, tiles)

# fwd90_cluster: problems every query of which sees every key (what clusters take), across the tile shapes: an
# idle warpgroup in the last query block (its walk keeps the shared ring), key blocks past S zero-filled by TMA,
# GQA, dropout, three warpgroups, 64-byte rows (E = 96) beside 128-byte ones, 80-key blocks (E = 256: 40-row
# shares), soft-capping and ALiBi
CLUSTER_CASES = {
    "gqa_partial_tile": Case(batch=(2,), hq=4, hkv=2, L=1000, S=1000, E=128),
    "idle_warpgroup_short_keys": Case(hq=2, L=900, S=333, E=96, Ev=64),
    "dropout_three_warpgroups": Case(batch=(3,), hq=2, L=768, S=700, E=64, dropout_p=0.25),
    "e256": Case(hq=2, L=512, S=520, E=256),
    "softcap_alibi": Case(hq=4, L=256, S=300, E=128, softcap=30.0, alibi="head"),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CLUSTER_CASES))
@pytest.mark.parametrize("clusters", [1, 3])
def test_clusters_sharing_key_blocks_keep_the_bits(name, clusters, rng, monkeypatch):
    """fwd90_cluster = 2 (two CTAs of a cluster take neighbouring query blocks of a head and multicast each K and V
    block's halves into both) gives the same out and lse, bit for bit, as one CTA a tile, and the reference judges
    them; with one cluster and with three at once, so that each cluster walks many tiles."""
    import cupy

    monkeypatch.setattr(sources, "max_active_clusters", lambda *args: clusters)
    _knob_keeps_the_bits(build(CLUSTER_CASES[name], cupy, rng), rng, monkeypatch, "fwd90_cluster", (1, 2),
                         fwd90_skip_idle=True)


# Tiles dealt by the host's schedule, decoded (fwd90_schedule): causal with split tiles and GQA, batch dims, a window
# with dropout at E = 128 (one kv head), K and V broadcast over the batch, transposed (strided) operands.
SCHEDULE_CASES = {
    "causal_split_gqa": Case(hq=8, hkv=2, L=400, S=400, E=64, causal="upper_left"),
    "batch_dims": FEATURES["batch_dims"],
    "window_dropout_e128": Case(batch=(2,), hq=3, hkv=1, L=300, S=300, E=128, window=(37, 11), dropout_p=0.2),
    "kv_batch_broadcast": FEATURES["kv_batch_broadcast"],
    "strided": FEATURES["strided"],
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(SCHEDULE_CASES))
def test_scheduled_tiles_keep_the_bits(name, rng, monkeypatch):
    """The host's schedule, each tile decoded (fwd90_schedule, FWD90_SCHEDULE), gives the same out and lse, bit for
    bit, as the round-robin deal whose tile indices the kernel decodes, and the reference judges them. On a device
    of two SMs, so that each CTA walks many tiles."""
    import cupy

    monkeypatch.setattr(sources, "multiprocessors", lambda device: 2)
    _knob_keeps_the_bits(build(SCHEDULE_CASES[name], cupy, rng), rng, monkeypatch, "fwd90_schedule", (False, True),
                         fwd90_cluster=1)


def test_the_schedule_only_where_the_host_deals_the_tiles():
    """The Hopper forward reads the host's schedule (FWD90_SCHEDULE) where the host deals the tiles: a dense batch
    without clusters, a mask's queue or a packed batch's, and with fwd90_schedule on."""

    def scheduled(schedule=True, **changes):
        case = dataclasses.replace(Case(hq=2, L=512, S=512, E=128, causal="upper_left"), **changes)
        pr = build(case, np, np.random.default_rng(0))
        with pytest.MonkeyPatch.context() as mp:
            real = launches.config
            mp.setattr(launches, "config", lambda pr: dataclasses.replace(real(pr), fwd90_schedule=schedule))
            return "-DFWD90_SCHEDULE=1" in launches.sm90_forward_options(pr)

    assert scheduled()
    assert not scheduled(schedule=False)
    assert not scheduled(causal=None)  # (clusters)
    assert not scheduled(mask="bool", mask_shape=(512, 512))
    assert not scheduled(varlen=((100, 130), (64, 64)))


def test_clusters_only_where_every_query_sees_every_key():
    """sm90_forward_config keeps fwd90_cluster only where every tile of a head walks the same key blocks and the
    query blocks pair up: not under a causal band, a window, an attn_mask or in a packed batch, nor with an odd
    number of query blocks."""

    def cluster_of(**changes):
        case = dataclasses.replace(Case(hq=2, L=512, S=512, E=128), **changes)
        pr = build(case, np, np.random.default_rng(0))
        with pytest.MonkeyPatch.context() as mp:
            real = launches.config
            mp.setattr(launches, "config", lambda pr: dataclasses.replace(real(pr), fwd90_cluster=2))
            return launches.sm90_forward_config(pr).fwd90_cluster

    assert cluster_of() == 2
    assert cluster_of(dropout_p=0.1, alibi="head", softcap=5.0) == 2
    assert cluster_of(causal="upper_left") == 1
    assert cluster_of(window=(100, -1)) == 1
    assert cluster_of(mask="bool") == 1
    assert cluster_of(varlen=((512, 512), (300, 200))) == 1
    assert cluster_of(L=300) == 1  # three query blocks of 128 rows


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["gqa", "causal_short_keys", "dropout", "varlen", "window"])
def test_three_consumer_warpgroups(name, rng, monkeypatch):
    """192-row tiles (three consumer warpgroups), which E <= 64 takes except on short causal problems, with
    both causal alignments, dropout, packed sequences and windows."""
    import dataclasses


    monkeypatch.setattr(launches, "config", lambda pr: dataclasses.replace(
        config.FlashConfig.for_problem(pr.E, pr.Ev, pr.L, pr.causal), fwd90_warpgroups=3))
    _gpu_check(FEATURES[name], rng, grads=False)


@pytest.mark.gpu
def test_dropout_mask_is_bit_identical_to_the_reference(rng):
    """With V = I the output is the dropped attention matrix itself: its zeros are the keep-mask."""
    import cupy

    from cusdpa import philox, problem

    L, S, p, seed = 70, 64, 0.4, int(rng.integers(0, 2**63))
    q = cupy.asarray(rng.standard_normal((2, 3, L, 64)) * 0.1, dtype=np.float16)
    k = cupy.asarray(rng.standard_normal((2, 3, S, 64)) * 0.1, dtype=np.float16)
    v = cupy.asarray(np.broadcast_to(np.eye(S), (2, 3, S, S)), dtype=np.float16)
    pr = problem.from_dense(q, k, v, None, problem.Options(dropout_p=p), (seed, 5))
    out, _ = flash.IMPL.forward(pr)
    keep = philox.keep_mask(seed, 5, np.arange(6), L, S, p).reshape(2, 3, L, S)
    np.testing.assert_array_equal(cupy.asnumpy(out) != 0, keep)


# Hopper's backward at both steps (dropout too), its orders: banded (causal, a window; varlen) and rotated (every
# pair visible, key blocks no more than query blocks) or not (more key blocks); the wide kernel (E > 128)
# adds even and odd key blocks into two copies of the accumulator
BIT_IDENTICAL = {
    "dropout": dict(E=128, causal="upper_left", dropout_p=0.1), "causal": dict(E=128, causal="upper_left"),
    "causal_64": dict(E=64, causal="upper_left"), "window": dict(E=64, window=(70, 20)),
    "rotated": dict(E=128, L=300, S=500), "long_keys": dict(E=64, L=200, S=700),
    "varlen": dict(E=128, causal="lower_right", varlen=((300, 260), (70, 400), (0, 5), (129, 129))),
    "head_dim_96": dict(E=96, causal="upper_left"), "head_dims_32_128": dict(E=32, Ev=128, window=(50, 50)),
    "head_dim_256": dict(E=256, causal="upper_left", dropout_p=0.1), "head_dims_192_128": dict(E=192, Ev=128),
    "head_dim_256_rotated": dict(E=256, L=500, S=300), "head_dim_160": dict(E=160, window=(60, 30)),
    "head_dim_192_varlen": dict(E=192, causal="lower_right", varlen=((300, 260), (70, 400), (0, 5), (129, 129)))}


def _assert_deterministic_backward(case: dict, defaults: dict, repeats: int, rng) -> None:
    """The deterministic backward of BIT_IDENTICAL's ``case`` is bit-identical over ``repeats`` more runs;
    the default (atomic dQ on Hopper) differs from it in dQ's rounding only."""
    import cupy

    pr = build(Case(**{**defaults, **case}), cupy, rng)
    dout = cupy.asarray(draw(rng, pr.out_shape, pr.dtype_name))
    out, lse = flash.IMPL.forward(pr)
    first = flash.IMPL.backward(pr, out, lse, dout, True)
    for _ in range(repeats):
        again = flash.IMPL.backward(pr, out, lse, dout, True)
        for a, b in zip(first, again):
            assert cupy.array_equal(a.view(np.uint16), b.view(np.uint16))
    dq, dk, dv = flash.IMPL.backward(pr, out, lse, dout)
    assert cupy.array_equal(dk.view(np.uint16), first[1].view(np.uint16))
    assert cupy.array_equal(dv.view(np.uint16), first[2].view(np.uint16))
    want = first[0].astype(np.float32)
    assert float(cupy.linalg.norm(dq.astype(np.float32) - want) / cupy.linalg.norm(want)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(BIT_IDENTICAL))
def test_backward_is_bit_identical_run_to_run(name, rng):
    _assert_deterministic_backward(BIT_IDENTICAL[name], dict(hq=4, hkv=1, L=300, S=300, seed=7), 3, rng)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["causal", "window", "head_dim_256"])
def test_deterministic_backward_when_key_blocks_outnumber_the_device(name, rng, monkeypatch):
    """With more key blocks than SMs the deterministic CTAs launch in descending order and never rotate;
    a device of one SM makes every problem take that path."""
    monkeypatch.setattr(sources, "multiprocessors", lambda device: 1)
    _assert_deterministic_backward(BIT_IDENTICAL[name], dict(hq=2, hkv=1, L=333, S=333, seed=3), 1, rng)


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["query", "value"])
def test_contiguous_input_off_16_byte_alignment(which, rng):
    """A contiguous view 2 bytes into its buffer is copied (cp.async reads 16-byte aligned rows); the result
    is bit-identical to that of an aligned copy, forward and backward."""
    import cupy

    from cusdpa import problem

    q, k, v, dout = (cupy.asarray(rng.standard_normal((2, 3, 70, 64)), dtype=np.float16) for _ in range(4))
    pr = problem.from_dense(q, k, v, None, problem.Options(is_causal=True))
    out, lse = flash.IMPL.forward(pr)
    grads = flash.IMPL.backward(pr, out, lse, dout)
    base = cupy.empty(q.size + 1, dtype=np.float16)
    shifted = base[1:].reshape(q.shape)
    shifted[...] = q if which == "query" else v
    args = (shifted, k, v) if which == "query" else (q, k, shifted)
    pr2 = problem.from_dense(*args, None, problem.Options(is_causal=True))
    out2, lse2 = flash.IMPL.forward(pr2)
    assert cupy.array_equal(out, out2) and cupy.array_equal(lse, lse2)
    for a, b in zip(grads, flash.IMPL.backward(pr2, out2, lse2, dout)):
        assert cupy.array_equal(a, b)


@pytest.mark.gpu
def test_nan_in_keys_nobody_sees_does_not_leak(rng):
    import cupy

    import cusdpa

    q = cupy.asarray(rng.standard_normal((2, 2, 50, 64)), dtype=np.float16)
    k = cupy.asarray(rng.standard_normal((2, 2, 90, 64)), dtype=np.float16)
    v = cupy.asarray(rng.standard_normal((2, 2, 90, 64)), dtype=np.float16)
    clean, vjp = cusdpa.attention_vjp(q, k, v, is_causal=True)  # upper-left: keys >= 50 are never seen
    k2, v2 = k.copy(), v.copy()
    k2[:, :, 60:] = np.nan
    v2[:, :, 50:] = np.inf
    dirty, vjp2 = cusdpa.attention_vjp(q, k2, v2, is_causal=True)
    assert cupy.array_equal(clean, dirty)
    dout = cupy.ones_like(clean)
    for a, b in zip(vjp(dout), vjp2(dout)):
        assert bool(cupy.isfinite(b[:, :, :50]).all())
        assert cupy.array_equal(a[:, :, :50], b[:, :, :50])


@pytest.mark.gpu
def test_dispatch_picks_flash_and_explains_fallbacks(rng):
    import cupy

    import cusdpa

    q = cupy.asarray(rng.standard_normal((1, 2, 16, 64)), dtype=np.float16)
    assert cusdpa.explain(q, q, q).chosen is cusdpa.Backend.FLASH
    q32 = q.astype(np.float32)
    assert any("float32" in r for r in cusdpa.explain(q32, q32, q32).reasons[cusdpa.Backend.FLASH])
    # masks: the Hopper kernels read bool and float masks both ways, and give a float mask's gradient up to head
    # dim 128 (FlashConfig.bwd90_mask_grad); past that EFFICIENT computes it (the GPU tests run on an H200)
    mask = cupy.zeros((16, 16), np.float16)
    assert cusdpa.explain(q, q, q, mask).chosen is cusdpa.Backend.FLASH
    assert cusdpa.explain(q, q, q, mask, need_grad=True).chosen is cusdpa.Backend.FLASH
    wide = cupy.asarray(rng.standard_normal((1, 2, 16, 192)), dtype=np.float16)
    assert any("float attn_mask" in r
               for r in cusdpa.explain(wide, wide, wide, mask, need_grad=True).reasons[cusdpa.Backend.FLASH])
    keep = cupy.ones((16, 16), bool)
    assert cusdpa.explain(q, q, q, keep, need_grad=True).chosen is cusdpa.Backend.FLASH
    assert any("float64" in r for r in cusdpa.explain(q, q, q, mask.astype(np.float64)).reasons[cusdpa.Backend.FLASH])
