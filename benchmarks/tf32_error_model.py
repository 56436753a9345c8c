"""A NumPy model of dq's error on EFFICIENT's fp32 tensor-core path, against the error rule (cusdpa.verify.judge).

    python benchmarks/tf32_error_model.py [--L 97] [--S 130] [--E 128] [--seeds 40] [--chunk 4]

fp32 runs on three TF32 products of split operands (efficient_common.cuh, Tf32Ops: big = x rounded to TF32 by
adding half an ulp, small = x - big truncated to TF32; small * big, big * small, then big * big, a k-step of 8 at
a time, each term's pass over every k-step before the next). The model computes dq = scale * (P o (dP - D)) K
for one head, non-causal, no dropout, three ways: float64 (the reference), fp32 products (the yardstick's kind),
and the split products, each product's exact k-step added into an fp32 accumulator rounded to nearest ("split"),
or toward zero ("split-rz", as tensor cores are reported to normalise their sums; "split-rz-chunk": a fix to
weigh, the big * big pass in partial sums of ``--chunk`` k-steps, each from zero, added into the accumulator
rounded to nearest). It prints, over ``--seeds``
draws of standard normal inputs, the split's error over the yardstick's and how often it passes the rule's bound
for gradients (3 x the yardstick's error + 2^-19 x max|reference|). CPU only; a model of the arithmetic, not of
the kernels' order of work across blocks.
"""
from __future__ import annotations

import argparse

import numpy as np


def _tf32(x, rounded: bool):
    bits = x.astype(np.float32).view(np.uint32)
    if rounded:
        bits = bits + np.uint32(0x1000)
    return (bits & np.uint32(0xFFFFE000)).view(np.float32)


def _split(x):
    big = _tf32(x, True)
    return big.astype(np.float64), _tf32(x - big, False).astype(np.float64)


def _toward_zero(x):
    r = x.astype(np.float32)
    return np.where(np.abs(r.astype(np.float64)) > np.abs(x), np.nextafter(r, np.float32(0)), r)


def _product(a, b, mode: str, chunk: int = 4):
    """a @ b: per k-step of 8, the exact products (split: each of its three terms) added into an fp32
    accumulator (``mode``: dq's)."""
    rnd = _toward_zero if "-rz" in mode else (lambda x: x.astype(np.float32))
    acc = np.zeros((a.shape[0], b.shape[1]), np.float32)
    if mode.startswith("split"):
        (ab, as_), (bb, bs) = _split(a), _split(b)
    steps = [slice(s, s + 8) for s in range(0, a.shape[1], 8)]
    if not mode.startswith("split"):
        for k in steps:
            acc = rnd(acc.astype(np.float64) + a[:, k].astype(np.float64) @ b[k].astype(np.float64))
        return acc
    # as the loops issue them: each pass over every k-step before the next (small * big, big * small, big * big),
    # one product (mma) a k-step and term
    for x, y in ((as_, bb), (ab, bs)):
        for k in steps:
            acc = rnd(acc.astype(np.float64) + x[:, k] @ y[k])
    if not mode.endswith("chunk"):
        for k in steps:
            acc = rnd(acc.astype(np.float64) + ab[:, k] @ bb[k])
        return acc
    for c in range(0, len(steps), chunk):
        part = np.zeros_like(acc)
        for k in steps[c:c + chunk]:
            part = _toward_zero(part.astype(np.float64) + ab[:, k] @ bb[k])
        acc = (acc.astype(np.float64) + part).astype(np.float32)
    return acc


def dq(q, k, v, do, mode: str, chunk: int = 4):
    """dq of one head: mode "reference" (float64), "fp32", "split", "split-rz" or "split-rz-chunk"."""
    scale = 1 / np.sqrt(q.shape[1])
    if mode == "reference":
        q, k, v, do = (x.astype(np.float64) for x in (q, k, v, do))
        s = q @ k.T * scale
        p = np.exp(s - s.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        d = (do * (p @ v)).sum(1, keepdims=True)
        return (p * (do @ v.T - d)) @ k * scale
    s = _product(q, k.T, mode, chunk) * np.float32(scale)
    p = np.exp(s - s.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    d = (do * _product(p, v, mode, chunk)).sum(1, keepdims=True, dtype=np.float32)
    ds = (p * (_product(do, v.T, mode, chunk) - d)).astype(np.float32)
    return _product(ds, k, mode, chunk) * np.float32(scale)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--L", type=int, default=97)
    ap.add_argument("--S", type=int, default=130)
    ap.add_argument("--E", type=int, default=128)
    ap.add_argument("--seeds", type=int, default=40)
    ap.add_argument("--chunk", type=int, default=4, help="k-steps a partial sum of split-rz-chunk")
    args = ap.parse_args()
    print(f"L={args.L} S={args.S} E={args.E}, {args.seeds} draws: dq's error over the fp32 yardstick's")
    for mode in ("split", "split-rz", "split-rz-chunk"):
        ratios, passed = [], 0
        for seed in range(args.seeds):
            rng = np.random.default_rng(seed)
            q, k, v, do = (rng.standard_normal(shape).astype(np.float32)
                           for shape in ((args.L, args.E), (args.S, args.E), (args.S, args.E), (args.L, args.E)))
            ref = dq(q, k, v, do, "reference")
            yardstick = np.abs(dq(q, k, v, do, "fp32") - ref).max()
            error = np.abs(dq(q, k, v, do, mode, args.chunk) - ref).max()
            ratios.append(error / yardstick)
            passed += error <= 3 * yardstick + 2.0**-19 * max(np.abs(ref).max(), 1.0)
        print(f"{mode:14s} median {np.median(ratios):5.2f}  max {max(ratios):5.2f}  "
              f"within the bound {passed}/{args.seeds}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
