"""Parts a and d: one attention problem through every provider, each checked against the float64
reference before anything is timed.

The reference is cusdpa.reference in float64 on the problem's own device (CuPy on a GPU). The
yardstick (DESIGN.md) is PyTorch at the same precision: on a GPU its default SDPA on the same inputs,
on the CPU the reference with float32 accumulation and outputs in the input dtype. A provider may
err by at most 2x the yardstick's error (3x for gradients) plus one unit in the last place; one
that errs more is reported as failed and not timed.
"""
from __future__ import annotations

import numpy as np

from cusdpa import problem, reference
from cusdpa.verify import harness, judge
from .config import Options, Provider
from .device import Device, Point
from .providers import NotAvailable, TorchRun, make_run

GRADS = ("dq", "dk", "dv")


def grid_points(opts: Options) -> list[Point]:
    """DESIGN.md's grid: B * L = tokens and Hq * E = hidden, L = S."""
    s = opts.sizes
    return [Point(s.tokens // L, s.hidden // E, L, L, E, dtype, causal)
            for dtype in s.dtypes for E in s.head_dims for causal in opts.causal for L in s.lengths]


def tutorial_point(opts: Options) -> Point:
    B, H, L, E = opts.sizes.tutorial
    return Point(B, H, L, L, E, "float16", False)


def _truth(dev: Device, arrays, point: Point, need_grad: bool) -> dict:
    q, k, v, dout = (dev.wide(x) for x in arrays)
    pr = problem.from_dense(q, k, v, None, problem.Options(is_causal=point.causal))
    truth = {"out": reference.forward(pr)[0]}
    if need_grad:
        truth.update(zip(GRADS, reference.backward(pr, dout)))
    return truth


def _yardstick(dev: Device, inputs, point: Point, need_grad: bool) -> dict:
    if dev.gpu:
        run = TorchRun(Provider("torch", "torch", None), inputs, point)
        base = {"out": run.forward()[1]}
        if need_grad:
            base.update(zip(GRADS, run.backward()[2]))
    else:
        q, k, v, dout = inputs.arrays
        pr = problem.from_dense(q, k, v, None, problem.Options(is_causal=point.causal))
        base = {"out": reference.forward(pr, np.float32)[0]}
        if need_grad:
            base.update(zip(GRADS, reference.backward(pr, dout, np.float32)))
    return {name: dev.wide(x) for name, x in base.items()}


def _judged(dev: Device, got: dict, truth: dict, base: dict, dtype: str) -> tuple[dict, list[str]]:
    """Max errors against the reference, and the verdicts of the ones that exceed the yardstick."""
    errors, failures = {}, []
    for name, x in got.items():
        wide = dev.wide(x)
        errors[name] = judge.max_error(wide, truth[name])
        verdict = judge.judge(name, wide, truth[name], base[name], 2.0 if name == "out" else 3.0,
                                harness.FLOOR[dtype])
        if verdict:
            failures.append(verdict)
    return errors, failures


def _first_call(run, direction: str):
    """(function to time, grad_to_none, outputs by name) after calling it once."""
    if direction == "fwd":
        fn, out = run.forward()
        return fn, None, {"out": out}
    fn, leaves, grads = run.backward()
    return fn, leaves, dict(zip(GRADS, grads))


def measure(part: str, point: Point, providers: list[Provider], directions, opts: Options, dev: Device,
            results, seed: int, progress) -> None:
    """Check every (provider, direction) on ``point``, then time the ones that passed; one record each."""
    inputs = dev.inputs(point, seed)
    need_grad = "bwd" in directions
    truth = _truth(dev, inputs.arrays, point, need_grad)
    dev.free()  # the reference's temporaries (GBs at L = 16384) go back before any provider runs
    base = _yardstick(dev, inputs, point, need_grad)
    base_errors = {name: judge.max_error(x, truth[name]) for name, x in base.items()}
    checked = []
    for provider in providers:
        for direction in directions:
            record = dict(part=part, **point.fields(), direction=direction, provider=provider.id,
                          label=provider.label, flops=point.flops(direction))
            names = ("out",) if direction == "fwd" else GRADS
            record["yardstick_error"] = {n: base_errors[n] for n in names}
            skip = opts.skip_reason(provider, point.L, direction)
            if skip:
                results.add(dict(record, status="skipped", reason=skip))
                progress()
                continue
            try:
                run = make_run(provider, inputs, point)
                with run.context():
                    runs_on = run.chosen(direction == "bwd")
                    if runs_on:
                        record["runs_on"] = runs_on
                    fn, leaves, got = _first_call(run, direction)
                record["error"], failures = _judged(dev, got, truth, base, point.dtype)
                del got
            except NotAvailable as e:
                results.add(dict(record, status="n/a", reason=str(e)))
                progress()
                continue
            except Exception as e:  # recorded, and the bench goes on with the next provider
                results.add(dict(record, status="error", reason=f"{type(e).__name__}: {e}".splitlines()[0]))
                dev.free()
                progress()
                continue
            if failures:
                results.add(dict(record, status="failed", reason="; ".join(failures)))
                progress()
                continue
            checked.append((record, run, fn, leaves))
    del truth, base
    dev.free()
    for record, run, fn, leaves in checked:
        try:
            with run.context():
                t = dev.timer(fn, leaves)
            results.add(dict(record, status="ok", ms=t.ms, tflops=record["flops"] / t.ms / 1e9, runs=t.runs,
                             timer=t.method))
        except Exception as e:
            results.add(dict(record, status="error", reason=f"timing: {type(e).__name__}: {e}".splitlines()[0]))
            dev.free()
        progress()
