"""Host time per attention call, cusdpa against PyTorch in one process, on a problem small enough that the
host dominates.

    python benchmarks/overhead.py [--profile]

The tutorial's module (8 heads x 64, 32 x 512 tokens, fp16, causal), eager and under torch.compile, and one
attention call of its shape on torch tensors and on CuPy arrays, inference and forward + backward; forward
+ backward also on a small problem (1 x 8 heads x 128 tokens), where the GPU work is negligible, and that problem
with a bool mask on EFFICIENT against PyTorch's EFFICIENT_ATTENTION and on the default backends (FLASH, whose
masked plans the compiled replay takes too, native.MASK_SUMMARIES); the eager torch calls and the compiled module
on the Python path and also through the compiled replay (interop.native, built here first if it is not cached;
its forward op's body replays, and with native.GRAPH_FORWARD its attention is the library's graph_forward).
"host" is the time until one call returns, started with an empty stream queue (each call follows a synchronize),
so neither the GPU work behind earlier calls nor a full launch queue counts as host time; "with GPU" is the time
per call of a round of back-to-back calls synchronised once. The lent machine's host speed drifts by up to 2x
within minutes, so cusdpa's and PyTorch's rounds alternate, seven of each, and the table reports medians.
``--profile`` adds the GPU kernel times of both modules (torch.profiler) and cProfile tables, in microseconds per
call, of the eager forward call and of the backward op.
"""
from __future__ import annotations

import argparse
import cProfile
import dataclasses
import statistics
import time

import torch

import cusdpa
import interop
from cusdpa import dispatch, problem
from cusdpa.backends import flash
from interop import arguments, autograd, bridge, native, ops

# Calls per round: a back-to-back round stays under ~500 launches, since past about a thousand pending
# launches a stream's queue is full and the with-GPU figure would stop meaning anything.
CALLS, ROUNDS = 200, 7
MODULE_CALLS = 100  # a module call is ~4 launches
TRAINING_CALLS = 50  # forward + backward: ~7 launches each


def _round(fn, n=CALLS) -> tuple[list, float]:
    """(host microseconds of each of n calls, each started with an empty queue; with-GPU microseconds per
    call of n back-to-back calls)."""
    host = []
    for _ in range(n):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        host.append(1e6 * (time.perf_counter() - start))
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return host, 1e6 * (time.perf_counter() - start) / n


def measure(stages: dict, calls: int = CALLS) -> dict:
    """name -> (median host, median with GPU) over ROUNDS rounds of ``calls`` calls, the stages' rounds
    interleaved."""
    for fn in stages.values():
        fn()  # warm: plans built, kernels loaded
    rounds = {name: [] for name in stages}
    for _ in range(ROUNDS):
        for name, fn in stages.items():
            rounds[name].append(_round(fn, calls))
    out = {}
    for name, rs in rounds.items():
        medians = [statistics.median(r[0]) for r in rs]
        out[name] = (statistics.median(h for r in rs for h in r[0]), statistics.median(r[1] for r in rs))
        print(f"{name:44s} host {out[name][0]:7.1f} us   with GPU {out[name][1]:7.1f} us   "
              f"(host round medians {min(medians):.1f}-{max(medians):.1f})", flush=True)
    return out


class _Trivial(torch.autograd.Function):
    """The floor of any Python autograd.Function: one elementwise kernel forward, none backward."""

    @staticmethod
    def forward(ctx, q, k, v):
        return q * 1

    @staticmethod
    def backward(ctx, grad):
        return grad, grad, grad


def _compiled(fn, graph_forward: bool = False):
    """``fn`` with the compiled replay (interop.native) on, for its rounds only; ``graph_forward``: with
    native.GRAPH_FORWARD too (a compiled module traced in its first round holds the library's graph_forward)."""
    def run():
        default = native.GRAPH_FORWARD
        native.enable(True)
        native.GRAPH_FORWARD = graph_forward
        try:
            return fn()
        finally:
            native.enable(False)
            native.GRAPH_FORWARD = default

    return run


def _profile(name: str, fn, calls=2000, rows=18):
    """cProfile of ``calls`` calls of fn, own time per call in microseconds, largest first."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    prof.create_stats()
    table = sorted(prof.stats.items(), key=lambda item: -item[1][2])[:rows]
    print(f"\n{name}: own time per call (us), cProfile over {calls} calls (adds its own overhead)")
    for (file, line, func), (_, ncalls, tottime, cumtime, _) in table:
        where = f"{file.rsplit('/', 2)[-1]}:{line}({func})" if line else func
        print(f"  {1e6 * tottime / calls:7.2f}  cum {1e6 * cumtime / calls:7.2f}  x{ncalls / calls:4.1f}  {where}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    if not native.load():
        print(f"the compiled replay did not build: {native.reason()}")
    native.enable(False)  # the Python path, but in the rounds _compiled wraps
    torch.manual_seed(0)
    module = interop.CausalSelfAttention(8, 512, is_causal=True).cuda().half().eval()
    reference = interop.CausalSelfAttention(8, 512, is_causal=True, attention="torch").cuda().half().eval()
    x = torch.randn(32, 512, 512, device="cuda", dtype=torch.half)
    q = torch.randn(32, 8, 512, 64, device="cuda", dtype=torch.half)
    out, lse = torch.empty_like(q), torch.empty(32, 8, 512, device="cuda")
    cq, cout, clse = (bridge.as_array(t) for t in (q, out, lse))
    causal = problem.Options(is_causal=True)
    pr = problem.from_dense(cq, cq, cq, None, causal)
    values = arguments.options(**dataclasses.asdict(causal))  # the ops' option arguments, as the bridge makes them
    backends = "flash,efficient,math"
    op_args = (q, q, q, None, None, *values, None, backends)
    compiled, compiled_reference = torch.compile(module), torch.compile(reference)
    # traced with the compiled replay on (other frames than `compiled`'s, so Dynamo keeps each graph): the forward
    # op's body replays the plan, or with native.GRAPH_FORWARD the attention is the library's graph_forward
    compiled_native = torch.compile(lambda x: module(x))
    compiled_graph = torch.compile(lambda x: module(x))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    qg = q.detach().requires_grad_()
    small = torch.randn(1, 8, 128, 64, device="cuda", dtype=torch.half)
    sg = small.detach().requires_grad_()
    fwd_out, fwd_lse = ops.sdpa_fwd(*op_args)
    bwd_args = (q, q, q, q, None, None, fwd_out, fwd_lse, *values, None, backends, False, False)
    with torch.no_grad():
        print("the general path (first calls of a signature; masks, varlen):")
        measure({"problem.from_dense": lambda: problem.from_dense(cq, cq, cq, None, causal),
                 "dispatch.select": lambda: dispatch.select(pr),
                 "flash general path into out, lse": lambda: flash.IMPL.forward(pr, cout, clse)})
        print("\none call, inference:")
        t = measure({
            "torch.empty x2": lambda: (torch.empty_like(q), torch.empty_like(lse)),
            "op cusdpa::sdpa_fwd through the dispatcher": lambda: ops.sdpa_fwd(*op_args),
            "op kernel called directly": lambda: ops.call(ops.sdpa_fwd, *op_args),
            "cusdpa on CuPy arrays": lambda: cusdpa.scaled_dot_product_attention(cq, cq, cq, is_causal=True),
            "interop.scaled_dot_product_attention": lambda: interop.scaled_dot_product_attention(
                q, q, q, is_causal=True),
            "interop.sdpa, compiled replay": _compiled(lambda: interop.scaled_dot_product_attention(
                q, q, q, is_causal=True)),
            "torch SDPA": lambda: sdpa(q, q, q, is_causal=True)})
        print("\nthe tutorial's module, inference:")
        t.update(measure({"module, cusdpa": lambda: module(x), "module, torch": lambda: reference(x),
                          "module compiled, cusdpa": lambda: compiled(x),
                          "module compiled, cusdpa, compiled replay": _compiled(lambda: compiled_native(x)),
                          "module compiled, cusdpa, graph_forward": _compiled(lambda: compiled_graph(x),
                                                                              graph_forward=True),
                          "module compiled, torch": lambda: compiled_reference(x)}, MODULE_CALLS))
    print("\none call, forward and backward (gradients to q, k and v):")
    t.update(measure({
        "fwd+bwd, cusdpa": lambda: interop.scaled_dot_product_attention(qg, qg, qg, is_causal=True).backward(q),
        "fwd+bwd, torch": lambda: sdpa(qg, qg, qg, is_causal=True).backward(q),
        "fwd+bwd, compiled replay": _compiled(
            lambda: interop.scaled_dot_product_attention(qg, qg, qg, is_causal=True).backward(q)),
        "fwd+bwd, trivial Python Function": lambda: _Trivial.apply(qg, qg, qg).backward(q),
        "small fwd+bwd, cusdpa": lambda: interop.scaled_dot_product_attention(sg, sg, sg, is_causal=True).backward(
            small),
        "small fwd+bwd, torch": lambda: sdpa(sg, sg, sg, is_causal=True).backward(small),
        "small fwd+bwd, compiled replay": _compiled(
            lambda: interop.scaled_dot_product_attention(sg, sg, sg, is_causal=True).backward(small)),
        "backward op kernel called directly": lambda: ops.call(ops.sdpa_bwd, *bwd_args)}, TRAINING_CALLS))
    print("\na call that lands on EFFICIENT (bool mask, B=1 H=8 L=128 E=64; PyTorch's EFFICIENT_ATTENTION alike):")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mask = torch.rand(1, 1, 128, 128, device="cuda") > 0.2

    def efficient_ours():  # the backward runs on autograd's thread, with kernels_numba's default knobs
        with cusdpa.sdpa_kernel([cusdpa.Backend.EFFICIENT]):
            interop.scaled_dot_product_attention(sg, sg, sg, mask).backward(small)

    def efficient_theirs():
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            sdpa(sg, sg, sg, mask).backward(small)

    t.update(measure({"EFFICIENT fwd+bwd, cusdpa": efficient_ours,
                      "EFFICIENT fwd+bwd, torch": efficient_theirs,
                      "EFFICIENT fwd+bwd, compiled replay": _compiled(efficient_ours)}, TRAINING_CALLS))
    print("\nthe same masked call on FLASH (cusdpa's default backends; PyTorch's default choice):")

    def flash_ours():
        interop.scaled_dot_product_attention(sg, sg, sg, mask).backward(small)

    t.update(measure({"FLASH masked fwd+bwd, cusdpa": flash_ours,
                      "FLASH masked fwd+bwd, torch": lambda: sdpa(sg, sg, sg, mask).backward(small),
                      "FLASH masked fwd+bwd, compiled replay": _compiled(flash_ours)}, TRAINING_CALLS))
    spent = []
    real = autograd.Attention.backward

    def backward(ctx, *grads):  # the time autograd's thread spends in cusdpa's backward
        start = time.perf_counter()
        result = real(ctx, *grads)
        spent.append(time.perf_counter() - start)
        return result

    autograd.Attention.backward = staticmethod(backward)
    for _ in range(TRAINING_CALLS):
        interop.scaled_dot_product_attention(qg, qg, qg, is_causal=True).backward(q)
    autograd.Attention.backward = real
    print(f"{'time in Attention.backward per call':44s} host {1e6 * statistics.median(spent):7.1f} us")

    print("\ncusdpa's host time over PyTorch's (bars: eager forward 1.3, forward + backward 1.3, CuPy call against "
          "torch eager 1.5), and the compiled module's speed, PyTorch's time with GPU over cusdpa's (bar 0.95)")
    for what, ours, theirs in (("eager forward", "interop.scaled_dot_product_attention", "torch SDPA"),
                               ("eager forward, compiled", "interop.sdpa, compiled replay", "torch SDPA"),
                               ("eager forward + backward", "fwd+bwd, cusdpa", "fwd+bwd, torch"),
                               ("fwd + bwd, compiled replay", "fwd+bwd, compiled replay", "fwd+bwd, torch"),
                               ("small forward + backward", "small fwd+bwd, cusdpa", "small fwd+bwd, torch"),
                               ("small fwd + bwd, compiled", "small fwd+bwd, compiled replay", "small fwd+bwd, torch"),
                               ("CuPy call vs torch eager", "cusdpa on CuPy arrays", "torch SDPA"),
                               ("EFFICIENT fwd+bwd (bar 1.5)", "EFFICIENT fwd+bwd, cusdpa", "EFFICIENT fwd+bwd, torch"),
                               ("EFFICIENT fwd+bwd, compiled", "EFFICIENT fwd+bwd, compiled replay",
                                "EFFICIENT fwd+bwd, torch"),
                               ("FLASH masked fwd+bwd", "FLASH masked fwd+bwd, cusdpa", "FLASH masked fwd+bwd, torch"),
                               ("FLASH masked, compiled", "FLASH masked fwd+bwd, compiled replay",
                                "FLASH masked fwd+bwd, torch")):
        print(f"  {what:28s} host {t[ours][0]:7.1f} / {t[theirs][0]:7.1f} us = {t[ours][0] / t[theirs][0]:5.2f}x")
    for what, name in (("compiled module", "module compiled, cusdpa"),
                       ("compiled module, replayed", "module compiled, cusdpa, compiled replay"),
                       ("compiled module, graph op", "module compiled, cusdpa, graph_forward")):
        ours, theirs = t[name], t["module compiled, torch"]
        print(f"  {what:28s} host {ours[0]:7.1f} / {theirs[0]:7.1f} us; with GPU {ours[1]:7.1f} / "
              f"{theirs[1]:7.1f} us: speed {theirs[1] / ours[1]:5.2f}x")
    if args.profile:
        with torch.no_grad():
            # GPU time per kernel of the two modules: separates kernel time from host time above
            for name, fn in (("module, cusdpa", lambda: module(x)), ("module, torch", lambda: reference(x))):
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as kernels:
                    for _ in range(20):
                        fn()
                    torch.cuda.synchronize()
                print(f"\n{name}: GPU kernels of 20 calls")
                print(kernels.key_averages().table(sort_by="cuda_time_total", row_limit=6))
            _profile("interop.scaled_dot_product_attention, inference",
                     lambda: interop.scaled_dot_product_attention(q, q, q, is_causal=True))
        _profile("backward op kernel called directly", lambda: ops.call(ops.sdpa_bwd, *bwd_args), calls=500)
        _profile("EFFICIENT forward + backward, bool mask", efficient_ours, calls=200)


if __name__ == "__main__":
    main()
