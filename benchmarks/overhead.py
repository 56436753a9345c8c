"""Host time per attention call, stage by stage, on a problem small enough that the host dominates.

    python benchmarks/overhead.py [--profile]

The tutorial's module (8 heads x 64, 32 x 512 tokens, fp16, causal, inference), eager and under
torch.compile (whose graphs call the custom op). Each line is the
mean wall time of 200 calls issued back to back and then synchronised once, so a stage that is
cheaper than the GPU work behind it still shows its host cost. ``--profile`` adds the GPU kernel
times of both modules (torch.profiler) and a cProfile table of ``interop.scaled_dot_product_attention``
(the eager fast path once warm), sorted by own time.
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
from cusdpa import checks, dispatch, flash
from interop import bridge, plans


def timed(name, fn, n=200):
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    print(f"{name:34s} host {1e6 * host / n:7.1f} us   with GPU {1e6 * total / n:7.1f} us", flush=True)


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
    pr = checks.problem_from_dense(cq, cq, cq, is_causal=True)
    op = torch.ops.cusdpa.sdpa_fwd
    plan_args = (q, q, q, 0.0, True, None, False, "upper_left", None, "flash,efficient,math")
    plan = plans.lookup(*plan_args, backward=False)
    compiled, compiled_reference = torch.compile(module), torch.compile(reference)
    with torch.no_grad():
        stages = [
            ("bridge.as_array (one tensor)", lambda: bridge.as_array(q)),
            ("checks.problem_from_dense", lambda: checks.problem_from_dense(cq, cq, cq, is_causal=True)),
            ("dispatch.select", lambda: dispatch.select(pr)),
            ("flash forward into out, lse", lambda: flash.IMPL.forward(pr, cout, clse)),
            ("cusdpa sdpa on CuPy", lambda: cusdpa.scaled_dot_product_attention(cq, cq, cq, is_causal=True)),
            ("plans.lookup (a hit)", lambda: plans.lookup(*plan_args, backward=False)),
            ("plans.forward (2 tensors, 1 launch)", lambda: plans.forward(plan, q, q, q, 0)),
            ("torch.empty x2", lambda: (torch.empty_like(q), torch.empty_like(lse))),
            ("op cusdpa::sdpa_fwd", lambda: op(q, q, q, None, 0.0, True, None, False, "upper_left", None, None,
                                               "flash,efficient,math")),
            ("interop.scaled_dot_product_attention",
             lambda: interop.scaled_dot_product_attention(q, q, q, is_causal=True)),
            ("torch SDPA", lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)),
            ("module, cusdpa", lambda: module(x)),
            ("module, torch", lambda: reference(x)),
            ("module compiled, cusdpa", lambda: compiled(x)),
            ("module compiled, torch", lambda: compiled_reference(x)),
        ]
        for name, fn in stages:
            timed(name, fn)
    # training: forward and backward of one call, gradients to q, k and v
    qg = q.detach().requires_grad_()
    through_op = lambda q, k, v, is_causal: op(q, k, v, None, 0.0, is_causal, None, False, "upper_left", None, None,
                                                "flash,efficient,math")[0]
    for name, attend in (("fwd+bwd, cusdpa", interop.scaled_dot_product_attention),
                         ("fwd+bwd, cusdpa custom op", through_op),
                         ("fwd+bwd, torch", torch.nn.functional.scaled_dot_product_attention)):
        timed(name, lambda: attend(qg, qg, qg, is_causal=True).backward(q))
    with torch.no_grad():
        if args.profile:
            # GPU time per kernel of the two modules (a profiler makes cusdpa take its custom op, which
            # replays the same plan): separates kernel time from host time in the rows above
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
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
            print(text.getvalue())


if __name__ == "__main__":
    main()
