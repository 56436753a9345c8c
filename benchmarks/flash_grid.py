"""FLASH vs PyTorch's SDPA backends on the standard grid (DESIGN.md), forward and backward, in TFLOP/s.

    python benchmarks/flash_grid.py [--dtype bfloat16] [--lengths 1024 4096 16384] [--head-dims 64 128]

B * L = 16384 and Hq * E = 2048 throughout. Times are medians of CUDA-event timings after warm-up, L2
flushed before each run (triton.testing.do_bench). Each cusdpa point is checked against PyTorch's FLASH
output first.
"""
from __future__ import annotations

import argparse
import json

import cupy
import numpy as np
import torch
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

import cusdpa
from cusdpa import checks, flash

TORCH_BACKENDS = {"torch_flash": SDPBackend.FLASH_ATTENTION, "torch_cudnn": SDPBackend.CUDNN_ATTENTION}


def tflops(flop, ms):
    return flop / ms / 1e9


def measure(fn, warmup=25, rep=100):
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def point(dtype, L, E, causal):
    B, H = 16384 // L, 2048 // E
    tdt = getattr(torch, dtype)
    q, k, v, do = (torch.randn(B, H, L, E, device="cuda", dtype=tdt) for _ in range(4))
    cq, ck, cv, cdo = (cupy.from_dlpack(x) for x in (q, k, v, do))
    flop = 4.0 * B * H * L * L * E / (2 if causal else 1)
    row = {"dtype": dtype, "L": L, "E": E, "causal": causal}

    pr = checks.problem_from_dense(cq, ck, cv, is_causal=causal)
    out, lse = flash.IMPL.forward(pr)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    row["max_err_vs_torch_flash"] = float((torch.from_dlpack(out).float() - want.float()).abs().max())
    row["cusdpa_fwd_ms"] = measure(lambda: flash.IMPL.forward(pr))
    row["cusdpa_bwd_ms"] = measure(lambda: flash.IMPL.backward(pr, out, lse, cdo))
    for name, backend in TORCH_BACKENDS.items():
        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
        try:
            with sdpa_kernel(backend):
                o = torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, is_causal=causal)
                row[f"{name}_fwd_ms"] = measure(
                    lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal))
                row[f"{name}_bwd_ms"] = measure(lambda: o.backward(do, retain_graph=True))
        except RuntimeError as e:
            row[f"{name}_error"] = str(e).splitlines()[0]
    for key in list(row):
        if key.endswith("_ms"):
            direction = "fwd" if "_fwd_" in key else "bwd"
            row[key.replace("_ms", "_tflops")] = tflops(flop * (2.5 if direction == "bwd" else 1.0), row[key])
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = [point(args.dtype, L, E, c) for E in args.head_dims for L in args.lengths for c in (False, True)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"{'E':>4} {'L':>6} {'causal':>6} | {'fwd TF/s':>8} {'x flash':>7} {'x cudnn':>7} | "
          f"{'bwd TF/s':>8} {'x flash':>7} {'x cudnn':>7} | err")
    for r in rows:
        f, b = r["cusdpa_fwd_tflops"], r["cusdpa_bwd_tflops"]
        ratio = lambda d, n: (r[f"cusdpa_{d}_tflops"] / r[f"{n}_{d}_tflops"]) if f"{n}_{d}_tflops" in r else np.nan
        print(f"{r['E']:>4} {r['L']:>6} {str(r['causal']):>6} | {f:8.1f} {ratio('fwd', 'torch_flash'):7.2f} "
              f"{ratio('fwd', 'torch_cudnn'):7.2f} | {b:8.1f} {ratio('bwd', 'torch_flash'):7.2f} "
              f"{ratio('bwd', 'torch_cudnn'):7.2f} | {r['max_err_vs_torch_flash']:.3g}")


if __name__ == "__main__":
    main()
