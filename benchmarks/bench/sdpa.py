"""Parts a and d: one attention problem through every provider, each checked against the float64
reference before anything is timed.

The check is the one harness's (cusdpa.verify.harness.expect and judged): the reference is
cusdpa.reference in float64 on the problem's own device (CuPy on a GPU), the yardstick PyTorch at the
same precision on that device (cusdpa.verify.yardstick). A provider may err by at most 2x the
yardstick's error (3x for gradients) plus a unit of roundoff; one that errs more is reported as failed
and not timed.
"""
from __future__ import annotations

from cusdpa import problem
from cusdpa.verify import harness
from .config import Options, Provider
from .device import Device, Point
from .providers import NotAvailable, make_run

GRADS = ("dq", "dk", "dv")


def grid_points(opts: Options) -> list[Point]:
    """DESIGN.md's grid: B * L = tokens and Hq * E = hidden, L = S."""
    s = opts.sizes
    return [Point(s.tokens // L, s.hidden // E, L, L, E, dtype, causal)
            for dtype in s.dtypes for E in s.head_dims for causal in opts.causal for L in s.lengths]


def tutorial_point(opts: Options) -> Point:
    B, H, L, E = opts.sizes.tutorial
    return Point(B, H, L, L, E, "float16", False)


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
    q, k, v, dout = inputs.arrays
    pr = problem.from_dense(q, k, v, None, problem.Options(is_causal=point.causal))
    expected = harness.expect(pr, dout if "bwd" in directions else None)
    dev.free()  # the reference's and the yardstick's temporaries (GBs at L = 16384) go back before any provider
    checked = []
    for provider in providers:
        for direction in directions:
            record = dict(part=part, **point.fields(), direction=direction, provider=provider.id,
                          label=provider.label, flops=point.flops(direction))
            names = ("out",) if direction == "fwd" else GRADS
            record["yardstick_error"] = {n: expected.bounds[n].yardstick_error for n in names}
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
                record["error"], failures = harness.judged(expected, got)
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
    del expected
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
