"""Host time per attention call, stage by stage, cusdpa against PyTorch in one process, on a problem small
enough that the host dominates.

    python benchmarks/overhead.py [--profile]

The tutorial's module (8 heads x 64, 32 x 512 tokens, fp16, causal), eager and under torch.compile, and one
attention call of its shape on torch tensors and on CuPy arrays, inference and forward + backward. Each line
is the mean wall time of 200 calls issued back to back and then synchronised once ("host"), so a stage that
is cheaper than the GPU work behind it still shows its host cost, and the mean including that wait ("with
GPU"). The table at the end gives cusdpa's host time over PyTorch's for the issue's four comparisons.
``--profile`` adds the GPU kernel times of both modules (torch.profiler) and a cProfile table of the eager
call, sorted by own time.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

import cusdpa
import interop
from cusdpa import dispatch, problem
from cusdpa.backends import flash
from interop import autograd, bridge, ops

N = 200


def timed(name, fn, n=N) -> tuple[float, float]:
    """(host, host + GPU) microseconds per call."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    print(f"{name:40s} host {1e6 * host / n:7.1f} us   with GPU {1e6 * total / n:7.1f} us", flush=True)
    return 1e6 * host / n, 1e6 * total / n


class _Trivial(torch.autograd.Function):
    """The floor of any Python autograd.Function: one elementwise kernel forward, none backward."""

    @staticmethod
    def forward(ctx, q, k, v):
        return q * 1

    @staticmethod
    def backward(ctx, grad):
        return grad, grad, grad


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    module = interop.CausalSelfAttention(8, 512, is_causal=True).cuda().half().eval()
    reference = interop.CausalSelfAttention(8, 512, is_causal=True, attention="torch").cuda().half().eval()
    x = torch.randn(32, 512, 512, device="cuda", dtype=torch.half)
    q = torch.randn(32, 8, 512, 64, device="cuda", dtype=torch.half)
    out, lse = torch.empty_like(q), torch.empty(32, 8, 512, device="cuda")
    cq, cout, clse = (bridge.as_array(t) for t in (q, out, lse))
    causal = problem.Options(is_causal=True)
    pr = problem.from_dense(cq, cq, cq, None, causal)
    op_args = (q, q, q, None, 0.0, True, None, False, "upper_left", None, None, "flash,efficient,math")
    compiled, compiled_reference = torch.compile(module), torch.compile(reference)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    t = {}
    with torch.no_grad():
        stages = [
            ("bridge.as_array (one tensor)", lambda: bridge.as_array(q)),
            ("problem.from_dense", lambda: problem.from_dense(cq, cq, cq, None, causal)),
            ("dispatch.select", lambda: dispatch.select(pr)),
            ("flash general path into out, lse", lambda: flash.IMPL.forward(pr, cout, clse)),
            ("torch.empty x2", lambda: (torch.empty_like(q), torch.empty_like(lse))),
            ("op cusdpa::sdpa_fwd (dispatcher, a plan)", lambda: ops.sdpa_fwd(*op_args)),
            ("op kernel called directly (a plan)", lambda: ops.call(ops.sdpa_fwd, *op_args)),
            ("cusdpa on CuPy arrays", lambda: cusdpa.scaled_dot_product_attention(cq, cq, cq, is_causal=True)),
            ("interop.scaled_dot_product_attention", lambda: interop.scaled_dot_product_attention(q, q, q, is_causal=True)),
            ("torch SDPA", lambda: sdpa(q, q, q, is_causal=True)),
            ("module, cusdpa", lambda: module(x)),
            ("module, torch", lambda: reference(x)),
            ("module compiled, cusdpa", lambda: compiled(x)),
            ("module compiled, torch", lambda: compiled_reference(x)),
        ]
        for name, fn in stages:
            t[name] = timed(name, fn)
    # training: forward and backward of one call, gradients to q, k and v
    qg = q.detach().requires_grad_()
    for name, attend in (("fwd+bwd, cusdpa", interop.scaled_dot_product_attention), ("fwd+bwd, torch", sdpa),
                         ("fwd+bwd, trivial Python Function", lambda q, k, v, is_causal: _Trivial.apply(q, k, v))):
        t[name] = timed(name, lambda: attend(qg, qg, qg, is_causal=True).backward(q))
    out, lse = ops.sdpa_fwd(*op_args)
    bwd_args = (q, q, q, q, None, out, lse, 0.0, True, None, False, "upper_left", None, None, "flash,efficient,math",
                False)
    timed("op kernel of sdpa_bwd directly (a plan)", lambda: ops.call(ops.sdpa_bwd, *bwd_args))
    spent = []
    real = autograd.Attention.backward

    def backward(ctx, *grads):  # the time autograd's thread spends in cusdpa's backward
        start = time.perf_counter()
        result = real(ctx, *grads)
        spent.append(time.perf_counter() - start)
        return result

    autograd.Attention.backward = staticmethod(backward)
    timed("fwd+bwd, cusdpa (Function.backward timed)",
          lambda: interop.scaled_dot_product_attention(qg, qg, qg, is_causal=True).backward(q))
    autograd.Attention.backward = real
    print(f"{'  of which in Attention.backward':40s}      {1e6 * sum(spent) / len(spent):7.1f} us", flush=True)
    print("\ncusdpa's host time over PyTorch's (bars: eager forward 1.3, forward + backward 1.3, CuPy call against "
          "torch eager 1.5), and the compiled module's speed, PyTorch's time with GPU over cusdpa's (bar 0.95)")
    for what, ours, theirs in (("eager forward", "interop.scaled_dot_product_attention", "torch SDPA"),
                               ("eager forward + backward", "fwd+bwd, cusdpa", "fwd+bwd, torch"),
                               ("CuPy call vs torch eager", "cusdpa on CuPy arrays", "torch SDPA")):
        print(f"  {what:28s} host {t[ours][0]:7.1f} / {t[theirs][0]:7.1f} us = {t[ours][0] / t[theirs][0]:5.2f}x")
    ours, theirs = t["module compiled, cusdpa"], t["module compiled, torch"]
    print(f"  {'compiled module':28s} host {ours[0]:7.1f} / {theirs[0]:7.1f} us; with GPU {ours[1]:7.1f} / "
          f"{theirs[1]:7.1f} us: speed {theirs[1] / ours[1]:5.2f}x")
    with torch.no_grad():
        if args.profile:
            # GPU time per kernel of the two modules: separates kernel time from host time in the rows above
            for name, fn in (("module, cusdpa", lambda: module(x)), ("module, torch", lambda: reference(x))):
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as kernels:
                    for _ in range(20):
                        fn()
                    torch.cuda.synchronize()
                print(f"{name}: GPU kernels of 20 calls")
                print(kernels.key_averages().table(sort_by="cuda_time_total", row_limit=6))
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(50):
                interop.scaled_dot_product_attention(q, q, q, is_causal=True)
            torch.cuda.synchronize()
            prof.disable()
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
            print(text.getvalue())


if __name__ == "__main__":
    main()
