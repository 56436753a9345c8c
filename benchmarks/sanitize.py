"""Every kernel family once, forward and backward, on small shapes: what ``on_device.sh sanitize`` runs under
compute-sanitizer's memcheck, racecheck, synccheck and initcheck.

    compute-sanitizer --tool memcheck python benchmarks/sanitize.py

FLASH: the Hopper wgmma forward (E = 64 and 128), the mma.sync forward (E = 40, E != Ev, and E = 64 with
wgmma turned off), the backward's preprocess, dK/dV (whole and split in two passes for E = 256) and dQ
kernels, with causal, window, GQA, dropout and varlen. EFFICIENT: the tensor_core forward and backward (dQ,
dK/dV; E = 64 with a bool mask, E = 128 with GQA, dropout and lower-right causal; the backward's column parts at
fp32 E = 128 and bf16 E = 256; the forward's mask tiles), the fused tensor_core backward and its passes, the
fp32 tensor_core loops (TF32),
the portable forward, dQ, dK/dV and mask-gradient kernels,
with bool and float masks. The Hopper forward with O stored by TMA (its default on these shapes) and from
registers, and the KV cache's decode kernels (append, split with its last CTAs' merge; paged). Odd sizes,
so every kernel runs partial
tiles. Each case is checked against the float64 reference, so a kernel that the sanitizer slows down or
that reads garbage is also caught here.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import re

import numpy as np

import cusdpa
import kernels_numba
from cusdpa import Backend, reference
from cusdpa.backends.flash import config, launches

CASES = [  # (name, backend, dtype, (B, Hq, Hkv, L, S, E, Ev), options, mask kind, EFFICIENT variant[+knobs])
    ("flash wgmma E64 causal", Backend.FLASH, "bfloat16", (2, 4, 2, 77, 77, 64, 64), dict(is_causal=True), None, None),
    ("flash wgmma E128 window dropout", Backend.FLASH, "float16", (1, 2, 2, 70, 133, 128, 128),
     dict(window=(20, 5), dropout_p=0.2), None, None),
    ("flash mma.sync E40/Ev72 lower-right", Backend.FLASH, "bfloat16", (1, 4, 1, 45, 90, 40, 72),
     dict(is_causal=True, causal_variant="lower_right"), None, None),
    ("flash mma.sync E256 split dK/dV", Backend.FLASH, "float16", (1, 2, 2, 33, 65, 256, 256), {}, None, None),
    ("flash mma.sync E64 (wgmma off)", Backend.FLASH, "bfloat16", (1, 2, 2, 50, 50, 64, 64), dict(is_causal=True),
     None, "mma_sync"),
    ("efficient tensor_core bool mask", Backend.EFFICIENT, "float16", (2, 2, 2, 37, 51, 64, 64), {}, "bool",
     "tensor_core"),
    ("efficient tensor_core E128 GQA dropout", Backend.EFFICIENT, "bfloat16", (1, 4, 2, 45, 70, 128, 128),
     dict(dropout_p=0.2, is_causal=True, causal_variant="lower_right"), None, "tensor_core"),
    ("efficient fused backward E64 GQA causal", Backend.EFFICIENT, "bfloat16", (1, 4, 2, 70, 90, 64, 64),
     dict(is_causal=True), None, "tensor_core+fused"),
    ("efficient fused backward E128 dropout", Backend.EFFICIENT, "float16", (1, 2, 2, 45, 70, 128, 128),
     dict(dropout_p=0.2), None, "tensor_core+fused"),
    ("efficient tensor_core fp32 bool mask", Backend.EFFICIENT, "float32", (2, 2, 1, 37, 51, 64, 64), {}, "bool",
     "tensor_core+fp32"),
    ("efficient tensor_core mask tiles", Backend.EFFICIENT, "float16", (2, 2, 2, 37, 80, 64, 64), {}, "bool",
     "tensor_core+masktiles"),
    ("efficient tensor_core fp32 E96/72 window", Backend.EFFICIENT, "float32", (1, 2, 2, 50, 60, 96, 72),
     dict(window=(10, 3)), None, "tensor_core+fp32"),
    ("efficient tensor_core fp32 E128 column parts", Backend.EFFICIENT, "float32", (1, 2, 1, 45, 70, 128, 128),
     dict(is_causal=True), None, "tensor_core+fp32"),
    ("efficient tensor_core fp32 fast split E128 bool mask", Backend.EFFICIENT, "float32", (1, 2, 1, 45, 70, 128, 128),
     {}, "bool", "tensor_core+fp32+fastsplit"),
    ("efficient tensor_core E256 column parts float mask", Backend.EFFICIENT, "bfloat16", (1, 2, 2, 37, 51, 256, 192),
     {}, "float", "tensor_core+wide"),
    # a float mask broadcast over the batch: its gradient's fp32 sums added with atomics by the dq loop
    ("efficient tensor_core float mask gradient sums", Backend.EFFICIENT, "bfloat16", (2, 2, 2, 37, 51, 64, 64),
     dict(is_causal=True), "float", "tensor_core+masksums+masktiles"),
    # column parts' score products split across the pair, traded through shared memory under named barriers
    ("efficient tensor_core fp32 E128 shared scores GQA dropout bool mask", Backend.EFFICIENT, "float32",
     (1, 4, 2, 45, 70, 128, 128), dict(dropout_p=0.2), "bool", "tensor_core+fp32+sharedscores"),
    ("efficient tensor_core E192 shared scores causal float mask", Backend.EFFICIENT, "bfloat16",
     (1, 2, 2, 37, 51, 192, 160), dict(is_causal=True), "float", "tensor_core+wide+sharedscores+masktiles"),
    # the dk/dv loops' 32-query steps in dynamic shared memory past 48 KiB: fused (bf16 E128), fp32 column parts
    ("efficient tensor_core fused E128 dynamic shared memory bool mask", Backend.EFFICIENT, "bfloat16",
     (1, 4, 2, 45, 70, 128, 128), dict(dropout_p=0.2), "bool", "tensor_core+fused+dynamic+masktiles"),
    ("efficient tensor_core fp32 E128 dynamic shared memory causal", Backend.EFFICIENT, "float32",
     (1, 2, 1, 45, 70, 128, 128), dict(is_causal=True), None, "tensor_core+fp32+dynamic"),
    ("efficient portable float mask", Backend.EFFICIENT, "float32", (1, 2, 1, 29, 41, 72, 40), dict(is_causal=True),
     "float", "portable"),
    ("efficient portable dropout", Backend.EFFICIENT, "bfloat16", (1, 2, 2, 30, 30, 64, 64), dict(dropout_p=0.3),
     None, "portable"),
    ("flash wgmma E128 O from registers", Backend.FLASH, "bfloat16", (2, 4, 2, 200, 150, 128, 128),
     dict(is_causal=True), None, "fwd90_tma_store=0"),
    # clusters of two CTAs multicasting K and V (the default where every query sees every key: two query blocks)
    ("flash wgmma E128 clusters GQA", Backend.FLASH, "bfloat16", (2, 4, 2, 200, 150, 128, 128), {}, None, None),
    # split tiles: 200 = 192 + 8 rows, the last query block's key blocks shared by three warpgroups whose partial
    # outputs meet in shared memory between two named barriers (the default at E = 64, causal)
    ("flash wgmma E64 split tiles causal", Backend.FLASH, "bfloat16", (2, 4, 2, 200, 200, 64, 64),
     dict(is_causal=True), None, None),
]

DECODE_CASES = [  # (name, dtype, (B, Hq, Hkv, Lq, capacity, E), paged, new tokens)
    ("decode split + merge", "float16", (3, 8, 2, 1, 700, 64), False, 0),
    ("decode paged, appended", "bfloat16", (2, 8, 2, 2, 1024, 128), True, 1),
]


def _dtype(name):
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def run(name, backend, dtype, dims, options, mask_kind, variant, rng) -> float:
    """Forward and backward of one case; the largest error against the reference, relative to its scale."""
    import cupy

    B, hq, hkv, L, S, E, Ev = dims
    host = [rng.standard_normal(s).astype(np.float32).astype(_dtype(dtype))
            for s in ((B, hq, L, E), (B, hkv, S, E), (B, hkv, S, Ev), (B, hq, L, Ev))]
    mask = None
    if mask_kind == "bool":
        mask = rng.random((B, 1, L, S)) > 0.2
    elif mask_kind == "float":
        mask = rng.standard_normal((hq, L, S)).astype(np.float32)
    q, k, v, dout = (cupy.asarray(x) for x in host)
    kw = dict(options, enable_gqa=hq != hkv, seed=11)
    if backend is Backend.EFFICIENT:
        variant, *flags = variant.split("+")
        knobs = kernels_numba.KernelConfig(variant=variant, fused_backward_head_dim=128 if "fused" in flags else 0,
                                           tensor_core_fp32="fp32" in flags,
                                           tensor_core_fp32_fast_split="fastsplit" in flags,
                                           tensor_core_shared_scores="sharedscores" in flags,
                                           tensor_core_head_dim=256 if "wide" in flags else 128,
                                           tensor_core_mask_tiles="masktiles" in flags,
                                           tensor_core_mask_grad_sum="masksums" in flags,
                                           tensor_core_dynamic_smem="dynamic" in flags)
    else:
        knobs = kernels_numba.current()
    with cusdpa.sdpa_kernel([backend]), kernels_numba.configured(knobs):
        out, vjp = cusdpa.attention_vjp(q, k, v, None if mask is None else cupy.asarray(mask), **kw)
        grads = vjp(dout)
    cupy.cuda.get_current_stream().synchronize()
    wide = [x.astype(np.float64) for x in host]
    want = [reference.attention(*wide[:3], mask, **kw)[0], *reference.attention_grads(*wide, mask, **kw)]
    return max(float(np.abs(cupy.asnumpy(g).astype(np.float64) - w).max() / max(1.0, np.abs(w).max()))
               for g, w in zip((out, *grads), want))


def run_decode(dtype, dims, paged, new, rng) -> float:
    """One call of cusdpa.kv_cache_attention (bottom-right causal, uneven cached lengths, ``new`` tokens appended,
    a paged cache of 64-slot blocks or a contiguous one); the largest error against the reference of each
    sequence's dense attention over its keys, relative to its scale."""
    import cupy

    B, hq, hkv, lq, cap, E = dims
    block = 64
    table = rng.permutation(B * cap // block).reshape(B, cap // block).astype(np.int32) if paged else None
    cells = (B * cap // block, block) if paged else (B, cap)
    k_host, v_host = (rng.standard_normal(cells + (hkv, E)).astype(np.float32).astype(_dtype(dtype)) for _ in range(2))
    q_host = rng.standard_normal((B, lq, hq, E)).astype(np.float32).astype(_dtype(dtype))
    new_host = [rng.standard_normal((B, new, hkv, E)).astype(np.float32).astype(_dtype(dtype)) for _ in range(2)]
    lengths = rng.integers(lq, cap - new, size=B).astype(np.int32)  # cached before the call
    out = cusdpa.kv_cache_attention(*(cupy.asarray(x) for x in (q_host, k_host, v_host, lengths)),
                                    *((cupy.asarray(x) for x in new_host) if new else ()),
                                    block_table=None if table is None else cupy.asarray(table), is_causal=True)
    got = cupy.asnumpy(out).astype(np.float64)
    err = 0.0
    for b in range(B):
        n = lengths[b] + new
        where = [(table[b, p // block], p % block) if paged else (b, p) for p in range(n)]
        keys, values = (np.stack([x[cell] for cell in where]) for x in (k_host, v_host))  # (n, hkv, E)
        keys[lengths[b]:], values[lengths[b]:] = new_host[0][b], new_host[1][b]
        want = reference.attention(q_host[b].transpose(1, 0, 2)[None].astype(np.float64),
                                   keys.transpose(1, 0, 2)[None].astype(np.float64),
                                   values.transpose(1, 0, 2)[None].astype(np.float64), is_causal=True,
                                   causal_variant="lower_right", enable_gqa=True)[0][0].transpose(1, 0, 2)
        err = max(err, float(np.abs(got[b] - want).max() / max(1.0, np.abs(want).max())))
    return err


REPORT_LINE = re.compile(r"Potential (?P<hazard>\w+) hazard"
                         r"|(?P<access>Write|Read) Thread \((?P<thread>\d+),\d+,\d+\) at (?P<by>[\w+]+)"
                         r"|(?P<uninit>Uninitialized __\w+__ memory \w+)|^=+\s+at (?P<site>[\w+]+)"
                         r"|(?P<race>Race reported between \w+ access at [\w+]+)")


def report(path: str) -> None:
    """A compute-sanitizer log of this script, summarised: each case's reports (the line that prints its error
    ends it) as distinct report lines with their counts; a hazard's threads as 'producer' (threads 0-127, the
    Hopper kernels' load warpgroup) or 'consumer'."""
    counts, item = collections.Counter(), []
    for line in open(path, errors="replace"):
        if "largest error" in line and not line.startswith("sanitize:"):  # a case's line, not the summary
            print(line.split(" largest")[0].strip() + ":" + ("" if counts else " none"))
            for what, n in counts.most_common():
                print(f"  {n:6d}  {what}")
            counts.clear()
            continue
        m = REPORT_LINE.search(line)
        if not m:
            continue
        if m["hazard"] or m["uninit"]:  # a report's first line; its sites follow
            item = [m["hazard"] or m["uninit"]]
        elif m["access"] and item:
            item.append(f"{m['access']} by {'producer' if int(m['thread']) < 128 else 'consumer'} at {m['by']}")
            if len(item) == 3:
                counts[" / ".join(item)] += 1
                item = []
        elif m["site"] and item:
            counts[f"{item[0]} at {m['site']}"] += 1
            item = []
        elif m["race"]:
            counts[m["race"]] += 1


def _chosen(name: str, only: str) -> bool:
    """Whether case ``name`` runs: ``only`` is texts separated by "|", one of which the name holds."""
    return any(text in name for text in only.split("|"))


def main(only: str = "", o_from_registers: bool = False) -> int:
    rng = np.random.default_rng(0)
    worst = 0.0
    for name, backend, dtype, dims, options, mask_kind, variant in CASES:
        if not _chosen(name, only):
            continue
        if o_from_registers and backend is Backend.FLASH and variant is None:
            variant = "fwd90_tma_store=0"
        if backend is Backend.FLASH and variant is not None:  # FlashConfig changes (mma_sync: wgmma off)
            real = launches.config
            changes = dict(use_wgmma=False) if variant == "mma_sync" else config.knobs(variant)
            base = (lambda pr: config.FlashConfig.for_head_dims(pr.E, pr.Ev)) if variant == "mma_sync" else real
            launches.config = lambda pr: dataclasses.replace(base(pr), **changes)
            try:
                err = run(name, backend, dtype, dims, options, mask_kind, None, rng)
            finally:
                launches.config = real
        else:
            err = run(name, backend, dtype, dims, options, mask_kind, variant, rng)
        worst = max(worst, err)
        print(f"{name:40s} largest error / scale {err:.2e}", flush=True)
    for name, dtype, dims, paged, new in DECODE_CASES:
        if not _chosen(name, only):
            continue
        err = run_decode(dtype, dims, paged, new, rng)
        worst = max(worst, err)
        print(f"{name:40s} largest error / scale {err:.2e}", flush=True)
    # bf16 outputs round to 2**-8 relative; anything far above that is a wrong kernel, not rounding
    cases = sum(_chosen(name, only) for name, *_ in CASES + DECODE_CASES)
    print(f"sanitize: {cases} cases, largest error {worst:.2e} " + ("ok" if worst < 3e-2 else "TOO LARGE"))
    return 0 if worst < 3e-2 else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="the cases whose name holds this text (or one of several separated by |)")
    parser.add_argument("--report", metavar="LOG", help="summarise a compute-sanitizer log of this script instead")
    parser.add_argument("--o-from-registers", action="store_true",
                        help="the Hopper forward stores O from registers in every FLASH case (initcheck does not see "
                             "TMA's stores, and reports the backward's reads of such an O as uninitialised)")
    args = parser.parse_args()
    if args.report:
        report(args.report)
        raise SystemExit(0)
    raise SystemExit(main(args.only, args.o_from_registers))
