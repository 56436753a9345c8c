"""Decode attention alone: one query token per sequence against a full KV cache, cusdpa's
``interop.kv_cache_attention`` (contiguous and paged caches) against PyTorch's SDPA over the same cache and
against the KV-read floor (the cache's bytes at 4.3 TB/s, what this H200 reads) and against a plain read of the
same bytes (one kernel streaming both caches, nothing computed: what a call that only reads costs on this card,
launch, ramp and tail included), in one process.

    python benchmarks/decode.py [--block-size 256] [--profile] [--phases] [--head-major]
                                [--config TILE=32 DEPTH=2 WARPS=4] [--shapes 16x8192 ...]

Shapes (the decode issue's, bf16, Hq = 32, Hkv = 8, E = 128): B=1 S=32768, B=16 S=8192, B=64 S=2048. The
cache is (B, S, Hkv, E), as FlashAttention's kvcache takes it; PyTorch reads it through (B, Hkv, S, E) views
with enable_gqa, as a static-cache model does. The paged cache holds the same keys in blocks of
``--block-size`` positions dealt to sequences in a shuffled block table. Each output is compared with
PyTorch's (relative Frobenius error) before it is timed; times are medians in microseconds, of
triton.testing.do_bench and of calls each after a read of a 512 MB buffer ("clean L2"). do_bench's L2 flush
zeroes a buffer, which leaves the L2 (50 MB) holding dirty lines that the timed call's reads evict and so write
back to DRAM, against 134 MB of keys read at B = 1; after a read the evicted lines are clean, as the KV-read
floor assumes. ``--profile`` also prints, per shape, the GPU kernels of ten contiguous-cache calls
(torch.profiler) and the host time of one call (until it returns, started on an idle GPU; median of 50).
``--phases`` also runs, per shape, the contiguous-cache call built with phases.cuh's per-warp clocks (ten
calls; the slots flash_decode.cu names) and prints each phase's share of the warps' clocks: the start, per
tile the copies' issue, the wait for the tile, S's products, the softmax, P V (with their clocks a tile),
then the epilogue and the end (the splits' merge).
The plain read's clean-L2 times at two sizes give a line, fixed microseconds a call plus bytes at a rate, printed
after the table beside the same line through cusdpa's and PyTorch's clean times.
``--head-major`` lays the contiguous caches out (B, Hkv, S, E) in memory (each head's keys contiguous; the
arguments keep their (B, S, Hkv, E) shape) for both libraries. ``--config`` sets the decode kernels' tile
constants (cusdpa/backends/flash/decode.py) for a sweep. ``--shapes BxS ...`` keeps those shapes only (one
shape under ncu: ``on_device.sh decode-ncu``).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import triton
from torch.nn import functional as F

import interop
from benchmarks.bench.timing import print_kernels
from cusdpa.backends.flash import decode

SHAPES = ((1, 32768), (16, 8192), (64, 2048))
HQ, HKV, E = 32, 8, 128
READ_BYTES_PER_S = 4.3e12


def _profile(name, fn):
    print_kernels(name, fn)
    host = []
    for _ in range(50):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        host.append((time.perf_counter() - start) * 1e6)
    torch.cuda.synchronize()
    print(f"{name}: host us per call {statistics.median(host):.1f}")


# phases.cuh's slots as flash_decode.cu uses them: (name, slot); per tile the loop's, once a warp the others
PHASE_ROWS = (("start (Q)", "PH_START"), ("copies issued", "PH_ISSUE"), ("wait for the tile", "PH_WAIT_K"),
              ("S products issued", "PH_WAIT_S"), ("softmax (waits for S)", "PH_SOFTMAX"), ("P V issued", "PH_WAIT_PV"),
              ("epilogue (warps' merge, split's writes)", "PH_EPILOGUE"), ("end (arrival, splits' merge)", "PH_END"))


def phase_report(fn, E: int, reps: int = 10) -> list[str]:
    """The clocks of ``reps`` calls of ``fn`` (a contiguous-cache bf16 call, E = Ev) built with the per-warp phase
    clocks, as an average warp's per phase (and per tile for the loop's)."""
    import cupy

    from benchmarks.fwd90_phases import phase_header
    from cusdpa.backends.flash import sources

    constants, slots = phase_header()
    decode.PHASES = 1
    interop.kv_cache._plans.clear()  # (plans and builds are cached by signature, not by the module's constants)
    decode.build.cache_clear()
    try:
        fn()  # compiled, then the counters zeroed
        device = torch.cuda.current_device()
        cache = decode.Operand((1, 1, HKV, E), (HKV * E, HKV * E, E, 1), True)  # (only paged caches' shape counts)
        _, _, options = decode.choices(device, "bfloat16", E, E, cache, False, False, False)
        module = sources.module(device, "flash_decode.cu", options)
        cells = cupy.ndarray((constants["PHASE_CTAS"], constants["PHASE_WARPS"], constants["PHASE_SLOTS"]),
                             dtype=cupy.uint64, memptr=module.get_global("cusdpa_phases"))
        cells.fill(0)
        torch.cuda.synchronize()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        sums = cupy.asnumpy(cells).astype(np.float64).sum(axis=(0, 1))
    finally:
        decode.PHASES = 0
        interop.kv_cache._plans.clear()
        decode.build.cache_clear()
    tiles = sums[slots["PH_BLOCKS"]]
    total = sum(sums[slots[slot]] for _, slot in PHASE_ROWS)
    lines = [f"  {tiles / reps:.0f} warp tiles a call; each phase's share of the warps' clocks (a tile's clocks):"]
    for name, slot in PHASE_ROWS:
        per = "" if slot in ("PH_START", "PH_EPILOGUE", "PH_END") else f", {sums[slots[slot]] / tiles:.0f} a tile"
        lines.append(f"    {name:<42} {100 * sums[slots[slot]] / total:5.1f}%{per}")
    return lines


def clean_l2_us(fn, reps: int = 50) -> float:
    """Median GPU time of ``fn()`` in microseconds, each call after a read of 512 MB (an L2 of clean lines)."""
    flush = torch.empty(512 << 20, dtype=torch.uint8, device="cuda").view(torch.int64)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        flush.sum()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


# One kernel that reads every byte of both caches once with 16-byte streaming loads, four in flight a thread,
# and stores nothing unless the data's xor hits a value no random cache gives (so no load is dead).
READ_SOURCE = r"""
extern "C" __global__ void read_both(const uint4* __restrict__ a, const uint4* __restrict__ b, long long n,
                                     unsigned* out) {
    unsigned acc = 0;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (int t = 0; t < 2; ++t) {
        const uint4* p = t ? b : a;
        long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
        for (; i + 3 * stride < n; i += 4 * stride) {
            uint4 x0 = __ldcs(p + i), x1 = __ldcs(p + i + stride), x2 = __ldcs(p + i + 2 * stride),
                  x3 = __ldcs(p + i + 3 * stride);
            acc ^= x0.x ^ x0.y ^ x0.z ^ x0.w ^ x1.x ^ x1.y ^ x1.z ^ x1.w ^ x2.x ^ x2.y ^ x2.z ^ x2.w
                 ^ x3.x ^ x3.y ^ x3.z ^ x3.w;
        }
        for (; i < n; i += stride) {
            uint4 x = __ldcs(p + i);
            acc ^= x.x ^ x.y ^ x.z ^ x.w;
        }
    }
    if (acc == 0x9e3779b9u) out[0] = acc;
}
"""


def plain_read(k_cache, v_cache):
    """A function launching READ_SOURCE over both caches (each contiguous, a multiple of 16 bytes) on the current
    stream: 4 CTAs of 512 threads an SM."""
    import cupy

    kernel = cupy.RawKernel(READ_SOURCE, "read_both")
    out = cupy.zeros(1, dtype=cupy.uint32)
    n = k_cache.numel() * k_cache.element_size() // 16
    grid = 4 * torch.cuda.get_device_properties(k_cache.device).multi_processor_count
    args = (cupy.uint64(k_cache.data_ptr()), cupy.uint64(v_cache.data_ptr()), cupy.int64(n), out)

    def read():
        with cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
            kernel((grid,), (512,), args)
    return read


def fit_line(points):
    """(fixed us, TB/s) of the line through two (bytes, us) points."""
    (b0, t0), (b1, t1) = points
    slope = (t1 - t0) / (b1 - b0)
    return t0 - slope * b0, 1e-6 / slope  # (bytes a microsecond, 1e6 a second, over 1e12)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--block-size", type=int, default=256, help="positions per block of the paged cache")
    ap.add_argument("--profile", action="store_true", help="each shape's GPU kernels and host time per call")
    ap.add_argument("--phases", action="store_true", help="each shape's per-warp phase clocks")
    ap.add_argument("--head-major", action="store_true", help="contiguous caches laid out (B, Hkv, S, E) in memory")
    ap.add_argument("--config", nargs="*", default=[], metavar="NAME=INT", help="decode kernel constants")
    ap.add_argument("--shapes", nargs="*", default=[f"{B}x{S}" for B, S in SHAPES], metavar="BxS",
                    help="the (batch, cache length) shapes to run")
    args = ap.parse_args()
    for item in args.config:
        name, value = item.split("=")
        if not isinstance(getattr(decode, name, None), int):  # a constant that is gone would change nothing
            ap.error(f"--config {item}: cusdpa.backends.flash.decode has no integer constant {name}")
        setattr(decode, name, int(value))
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for B, S in (tuple(map(int, shape.split("x"))) for shape in args.shapes):
        q = torch.randn(B, 1, HQ, E, device="cuda", dtype=torch.bfloat16, generator=g)
        if args.head_major:  # (B, S, Hkv, E) views of (B, Hkv, S, E) memory: each head's keys contiguous
            k_cache, v_cache = (torch.randn(B, HKV, S, E, device="cuda", dtype=torch.bfloat16, generator=g)
                                .transpose(1, 2) for _ in range(2))
        else:
            k_cache, v_cache = (torch.randn(B, S, HKV, E, device="cuda", dtype=torch.bfloat16, generator=g)
                                for _ in range(2))
        seqlens = torch.full((B,), S, dtype=torch.int32, device="cuda")
        per_seq = S // args.block_size
        order = torch.randperm(B * per_seq, device="cuda", generator=g)
        table = order.reshape(B, per_seq).to(torch.int32)
        k_paged, v_paged = (torch.empty(B * per_seq, args.block_size, HKV, E, device="cuda", dtype=torch.bfloat16)
                            for _ in range(2))
        for paged, dense in ((k_paged, k_cache), (v_paged, v_cache)):
            paged[order] = dense.reshape(B * per_seq, args.block_size, HKV, E)  # (copies a head-major view)

        def ours():
            return interop.kv_cache_attention(q, k_cache, v_cache, seqlens)

        def ours_paged():
            return interop.kv_cache_attention(q, k_paged, v_paged, seqlens, block_table=table)

        def theirs():
            return F.scaled_dot_product_attention(q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                                                  enable_gqa=True).transpose(1, 2)

        if args.profile:
            for name, fn in (("cusdpa", ours), ("PyTorch", theirs)):
                _profile(f"{name} B={B} S={S}", fn)
            for plan in interop.kv_cache._plans.values():  # the grids the plans chose
                print("launches (grid, block, smem):", [(x.grid, x.block, x.smem) if hasattr(x, "grid") else x
                                                        for x in plan.launches])
            interop.kv_cache._plans.clear()
        if args.phases:
            print(f"phases B={B} S={S}:", *phase_report(ours, E), sep="\n")
        want = theirs().float()
        errors = [((f().float() - want).norm() / want.norm()).item() for f in (ours, ours_paged)]
        times = [triton.testing.do_bench(f) * 1e3 for f in (ours, ours_paged, theirs)]
        read = plain_read(k_cache, v_cache) if k_cache.is_contiguous() else None
        clean = [clean_l2_us(f) for f in (ours, theirs, read) if f is not None]
        nbytes = 2 * B * S * HKV * E * 2  # both caches, bf16
        rows.append((B, S, *errors, *times, *clean[:2], clean[2] if read else float("nan"), nbytes))
        print(rows[-1], flush=True)
    print("\n| B | S | rel. error (contiguous, paged) | cusdpa us | paged us | PyTorch us | floor us | x floor |"
          " x PyTorch | paged / contiguous | clean L2: cusdpa us | PyTorch us | x floor | x PyTorch | plain read us |"
          " x read |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for B, S, e0, e1, t0, t1, t2, c0, c2, c3, nbytes in rows:
        floor = nbytes / READ_BYTES_PER_S * 1e6
        print(f"| {B} | {S} | {e0:.1e}, {e1:.1e} | {t0:.1f} | {t1:.1f} | {t2:.1f} | {floor:.1f} | {t0 / floor:.2f} |"
              f" {t2 / t0:.2f} | {t1 / t0:.2f} | {c0:.1f} | {c2:.1f} | {c0 / floor:.2f} | {c2 / c0:.2f} | {c3:.1f} |"
              f" {c0 / c3:.2f} |")
    sizes = {}
    for *_, c0, c2, c3, nbytes in rows:  # the caches' bytes: their clean times
        sizes.setdefault(nbytes, (c0, c2, c3))
    if len(sizes) >= 2:
        (b0, t0), (b1, t1) = sorted(sizes.items())[:2]
        for i, name in enumerate(("cusdpa", "PyTorch", "plain read")):
            fixed, rate = fit_line(((b0, t0[i]), (b1, t1[i])))
            print(f"clean L2, a line through {b0 / 1e6:.0f} and {b1 / 1e6:.0f} MB: {name} {fixed:.1f} us a call"
                  f" + {rate:.2f} TB/s")


if __name__ == "__main__":
    main()
