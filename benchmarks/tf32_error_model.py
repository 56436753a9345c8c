"""A NumPy model of dq's error on EFFICIENT's fp32 tensor-core path, against the error rule (cusdpa.verify.judge).

    python benchmarks/tf32_error_model.py [--L 97] [--S 130] [--E 128] [--seeds 40]

fp32 runs on three TF32 products of split operands (efficient_common.cuh, Tf32Ops: big = x rounded to TF32 by
adding half an ulp, small = x - big truncated to TF32; small * big, big * small, then big * big, one mma a k-step
of 8 and term). The model computes dq = scale * (P o (dP - D)) K for one head, non-causal, no dropout: in float64
(the reference), with fp32 products (the yardstick's kind), and with the split products as the loops add them:
every product (S = Q K^T, dP = dO V^T, D on dP's fragments: product_abt; O = P V, dQ = dS K: product_pb) takes
each k-step's three terms into a zeroed fragment, then adds it to the accumulator by an FADD, which rounds to
nearest. The mma's additions round to nearest ("split") or toward zero ("split-rz", the loops: tensor cores
truncate, BENCHMARKS.md). "split-rz-chained": the score products as the loops took them before the forty-seventh
session, every k-step's three terms chained in the one accumulator. It prints, over ``--seeds`` draws of
standard normal inputs, the error over the yardstick's and how often it passes the rule's bound for gradients
(judge.bound). CPU only; a model of the arithmetic, not of the kernels' order of work across blocks.
"""
from __future__ import annotations

import argparse

import numpy as np

from cusdpa.verify import judge


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


def _mma(acc, a, b, rz: bool):
    """acc + a @ b (exact in float64) rounded into fp32: to nearest, or toward zero."""
    total = acc.astype(np.float64) + a @ b
    return _toward_zero(total) if rz else total.astype(np.float32)


def _product(a, b, mode: str, scores: bool):
    """a @ b in ``mode`` (dq's), a k-step of 8 at a time; ``scores``: a product_abt (which "split-rz-chained"
    chains), else a product_pb."""
    acc = np.zeros((a.shape[0], b.shape[1]), np.float32)
    steps = [slice(s, s + 8) for s in range(0, a.shape[1], 8)]
    if mode == "fp32":
        for k in steps:
            acc = _mma(acc, a[:, k].astype(np.float64), b[k].astype(np.float64), False)
        return acc
    rz = mode != "split"
    (ab, as_), (bb, bs) = _split(a), _split(b)
    terms = ((as_, bb), (ab, bs), (ab, bb))
    chained = scores and mode == "split-rz-chained"
    for k in steps:
        step = acc if chained else np.zeros_like(acc)
        for x, y in terms:
            step = _mma(step, x[:, k], y[k], rz)
        acc = step if chained else acc + step
    return acc


def dq(q, k, v, do, mode: str):
    """dq of one head: mode "reference" (float64), "fp32", "split", "split-rz" or "split-rz-chained"."""
    scale = 1 / np.sqrt(q.shape[1])
    if mode == "reference":
        q, k, v, do = (x.astype(np.float64) for x in (q, k, v, do))
        s = q @ k.T * scale
        p = np.exp(s - s.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        d = (do * (p @ v)).sum(1, keepdims=True)
        return (p * (do @ v.T - d)) @ k * scale
    s = _product(q, k.T, mode, True) * np.float32(scale)
    p = np.exp(s - s.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    o = _product(p, v, mode, False)
    d = np.diagonal(_product(do, o.T, mode, True))[:, None] if mode != "fp32" else \
        (do * o).sum(1, keepdims=True, dtype=np.float32)
    ds = (p * (_product(do, v.T, mode, True) - d)).astype(np.float32)
    return _product(ds, k, mode, False) * np.float32(scale)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--L", type=int, default=97)
    ap.add_argument("--S", type=int, default=130)
    ap.add_argument("--E", type=int, default=128)
    ap.add_argument("--seeds", type=int, default=40)
    args = ap.parse_args()
    print(f"L={args.L} S={args.S} E={args.E}, {args.seeds} draws: dq's error over the fp32 yardstick's")
    for mode in ("split", "split-rz", "split-rz-chained"):
        ratios, passed = [], 0
        for seed in range(args.seeds):
            rng = np.random.default_rng(seed)
            q, k, v, do = (rng.standard_normal(shape).astype(np.float32)
                           for shape in ((args.L, args.E), (args.S, args.E), (args.S, args.E), (args.L, args.E)))
            ref = dq(q, k, v, do, "reference")
            rule = judge.bound("dq", ref, dq(q, k, v, do, "fp32"), "float32")
            error = judge.max_error(dq(q, k, v, do, mode), ref)
            ratios.append(error / rule.yardstick_error)
            passed += rule.verdict(error) is None
        print(f"{mode:16s} median {np.median(ratios):5.2f}  max {max(ratios):5.2f}  "
              f"within the bound {passed}/{args.seeds}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
