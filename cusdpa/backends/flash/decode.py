"""Split-KV decode on tensor cores (kernels_cuda/flash_decode.cu): the launches of one KV-cache call
signature, prepared once and replayed on raw pointers, for ``cusdpa.kv_cache_attention`` on CuPy arrays
and its torch twin.

A call issues ``kv_cache_append``, which writes the new keys and values at each sequence's length (when a
call brings any), a memset of the arrival counts (when the keys are split, unless the caller passes counts it
keeps: the kernel leaves them zeroed), and ``flash_decode_split`` over (splits, B * Hkv) CTAs, whose last CTA
of each (sequence, kv head) merges that pair's splits. The lengths are read on the device only, so a call
never waits for the GPU, and the grid is sized from the cache's capacity: every split of a sequence takes an
equal share of the keys that sequence actually holds.

Operands are described by ``Operand`` (shape, strides in elements, 16-byte alignment), so both front ends
build the same plan from their own arrays.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..launch import Launch, MapSlot, Slot, ZeroWords, run
from ..plans import contiguous_strides
from . import sources
from .config import MAX_SMEM

# warps of a split CTA that attend (``warps``: fewer where their stages do not fit a CTA). Eight in two stages,
# one CTA an SM, against four in three, two CTAs an SM (H100, bf16 Hq = 32 Hkv = 8 E = 128, us, B = 1 S = 32768 /
# B = 16 S = 8192 / B = 64 S = 2048; benchmarks/decode.py --config): cp.async 67.0 / 189.4 / 190.7 -> 63.0 / 185.6 /
# 192.9, by TMA (TMA_BLOCKS) 63.5 / 185.7 / 190.4, PyTorch 63.3 / 183.5 / 187.8
WARPS = 8
TILE = 16  # keys of a warp's tile
ROWS = 16  # query rows of a CTA (Hq / Hkv x Lq): one m16 tile
MAX_SPLITS = 128
# stages of the rings: two (eight warps by TMA in three timed 63.4 / 186.1 / 191.8 us, in two 63.2-64.1 / 185.2-186.0 /
# 190.1-190.8, the shapes above; benchmarks/decode.py --config DEPTH=3)
DEPTH = 2
# the partial outputs a thread of the splits' merge loads in one batch (predicated, issued together): the merge is
# the call's tail at B = 1, a chain of L2 round trips, 4 a column pair at 32 splits with 8, 1 with 32. On the H100
# 8, 16 and 32 timed within 0.4% of one another (benchmarks/decode.py --config MERGE_UNROLL=8|16|32): 8, the
# fewest instructions
MERGE_UNROLL = 8
# the torch front end keeps the splits' workspace and arrival counts per (device, stream) from call to call
# (interop.kv_cache): no allocation and no memset launch per call, host time that B = 1 is bound by (on the H100:
# B = 1 S = 32768 71.8 -> 70.9 us, B = 16 and 64 within 0.5%; benchmarks/decode.py --config KEEP_WORKSPACE=0|1)
KEEP_WORKSPACE = 1
PHASES = 0  # 1: the split kernel built with phases.cuh's per-warp clocks (benchmarks/decode.py --phases)
# sm_90: the CTA's keys in blocks of warps x TILE that a producer warp loads by TMA into a ring the warps share
# (flash_decode.cu, DEC_TMA), where each warp's cp.async copies stall at issue for a third of its clocks. With
# eight warps (above) the most even of the choices: 0.98-1.00x PyTorch at the three shapes, where cp.async is
# 1.00 / 0.99 / 0.97x
TMA_BLOCKS = 1
DTYPES = ("float16", "bfloat16")


class Operand(NamedTuple):
    """What a plan knows of an array: shape, strides in elements, base 16-byte aligned."""

    shape: tuple
    strides: tuple
    aligned: bool


@dataclass(frozen=True)
class DecodePlan:
    """The launches of one signature. ``run`` takes raw device pointers (0 for an absent operand), the cached
    length of every sequence when no lengths array is given (``fixed_len``), and the buffers the caller
    allocates: out (``out_shape``, the query's dtype, contiguous), lse (``lse_shape``, float32) and, when
    ``part_floats``, a float32 workspace of ``workspace_floats`` elements (the splits' outputs, then
    their (m, l), then one int32 arrival count per (b, kvh), zeroed by the call), or of ``part_floats +
    ml_floats`` with ``arrivals``: ``arrival_words`` int32 counts the caller keeps zeroed (the launches leave
    them so), which the call then does not zero (``kept_launches``: ``launches`` without that memset).
    ``capacity`` and ``new`` are the positions a sequence holds and the tokens a call appends."""

    device: int
    launches: tuple
    kept_launches: tuple
    out_shape: tuple
    lse_shape: tuple
    part_floats: int
    ml_floats: int
    arrival_words: int
    capacity: int
    new: int

    @functools.cached_property
    def strides(self) -> tuple:
        """(out's, lse's) contiguous element strides: ``torch.Tensor.new_empty_strided`` allocates in fewer
        microseconds than ``new_empty``."""
        return contiguous_strides(self.out_shape), contiguous_strides(self.lse_shape)

    @property
    def workspace_floats(self) -> int:
        return self.part_floats + self.ml_floats + self.arrival_words

    def run(self, stream: int, q: int, k_cache: int, v_cache: int, table: int, seqlens: int, slopes: int, key: int,
            value: int, fixed_len: int, out: int, lse: int, part: int, arrivals: int = 0) -> None:
        if arrivals:
            launches = self.kept_launches
        else:  # the counts at the workspace's end, zeroed by the plan's memset
            launches, arrivals = self.launches, part + 4 * (self.part_floats + self.ml_floats)
        # the value tuple in launch.SLOTS order
        run(launches, (q, k_cache, v_cache, out, lse, None, None, None, None, None, None, None, None, None, None,
                       None, None, table, seqlens, slopes, part, part + 4 * self.part_floats, key, value,
                       fixed_len, None, arrivals), stream, self.device)


def _inner(x: Operand, rank: int) -> bool:
    """A rank-``rank`` operand whose last dim is contiguous and whose other strides keep 16-byte rows."""
    return len(x.shape) == rank and x.aligned and x.strides[-1] == 1 and all(s % 8 == 0 for s in x.strides[:-1])


def applies(dtype_name: str, q: Operand, k_cache: Operand, v_cache: Operand, new: Operand | None,
            new_v: Operand | None, capability: int) -> bool:
    """Whether these kernels take a call (shapes already checked): fp16/bf16 on sm_80 or newer, the query rows of
    a kv head within one m16 tile, head dims multiples of 8 up to 256, every operand read by 16-byte rows."""
    B, Lq, Hq, E = q.shape
    Hkv, Ev = k_cache.shape[2], v_cache.shape[3]
    return (dtype_name in DTYPES and capability >= 80 and Hkv > 0 and Hq % Hkv == 0 and 0 < Lq * (Hq // Hkv) <= ROWS
            and 0 < B * Hkv < 2**16  # the grid's y
            and 0 < E <= 256 and 0 < Ev <= 256 and E % 8 == 0 and Ev % 8 == 0
            and all(_inner(x, 4) for x in (q, k_cache, v_cache) + ((new, new_v) if new is not None else ())))


def warps(E: int, Ev: int, limit: int = MAX_SMEM) -> int:
    """Warps of a split CTA that attend: ``WARPS``, halved while their shared memory (smem_bytes, TMA's ring) does
    not fit ``limit`` bytes, the device's (sources.shared_per_block; sm_90's by default: head dim 256 four)."""
    w = WARPS
    while w > 1 and smem_bytes(E, Ev, w, True) > limit:
        w //= 2
    return w


def _q_bytes(E: int) -> int:
    """Q's rows in the split kernel's shared memory (padded by 16 bytes)."""
    return ROWS * ((E + 15) // 16 * 16 + 8) * 2


def _stage_bytes(E: int, Ev: int, w: int) -> int:
    """One stage of the rings of ``w`` warps: a tile's K and V rows, each whole 128-byte lines."""
    return w * TILE * ((E + 63) // 64 * 64 + (Ev + 63) // 64 * 64) * 2


def smem_bytes(E: int, Ev: int, w: int, tma: bool) -> int:
    """The split kernel's dynamic shared memory with ``w`` warps: Q and the rings' ``DEPTH`` stages (``tma``: the
    shared ring, from a 1024-byte boundary the kernel finds)."""
    return _q_bytes(E) + DEPTH * _stage_bytes(E, Ev, w) + (1024 if tma else 0)


def tma_head_dims(E: int, Ev: int) -> bool:
    """Head dims TMA's blocks take: whole 64-column boxes."""
    return E % 64 == 0 and Ev % 64 == 0


def takes_tma(E: int, Ev: int, k_cache: Operand, paged: bool, capability: int, w: int) -> bool:
    """Whether the split kernel's keys come in blocks by TMA (``TMA_BLOCKS``, sm_90): head dims of whole
    64-column boxes, and a block of keys (``w`` warps' tiles) within one cache row (contiguous caches, pages of
    whole blocks)."""
    return (bool(TMA_BLOCKS) and capability >= 90 and tma_head_dims(E, Ev)
            and (not paged or k_cache.shape[1] % (w * TILE) == 0))


def _cache_map(dtype_name: str, cache: Operand, D: int, keys: int):
    """The TMA map of a cache (rows, slots, Hkv, D) as (D, Hkv, slots, rows), boxes of 64 columns by a block's
    ``keys``, swizzled by 128 bytes (the kernel's `swz`). A dim of size 1, never stepped over, gets a stride TMA
    takes whatever the array's says."""
    from . import tma

    rows, slots, heads, _ = cache.shape
    sh = cache.strides[2] * 2 if heads > 1 else D * 2
    ss = cache.strides[1] * 2 if slots > 1 else heads * sh
    sr = cache.strides[0] * 2 if rows > 1 else slots * ss
    return tma.TensorMap(dtype_name, tma.ANY_ADDRESS, [D, heads, slots, rows], [sh, ss, sr], [64, 1, keys, 1])


def split_count(pairs: int, capacity: int, resident: int, w: int) -> int:
    """Splits of each (sequence, kv head)'s keys: the fewest whose CTAs fill the resident slots' waves within 5%
    of the best count's fill (more splits cost each CTA its prologue and the merge more work), no split
    shorter than one tile for each of the CTA's ``w`` warps."""
    most = max(1, min(MAX_SPLITS, -(-capacity // (w * TILE))))
    fills = [pairs * s / (-(-(pairs * s) // resident) * resident) for s in range(1, most + 1)]
    best = max(fills)
    return next(s for s, fill in enumerate(fills, 1) if fill >= 0.95 * best)


def compile_options(dtype_name: str, E: int, Ev: int, paged: bool, softcap: bool, alibi: bool,
                    tma: bool = False, w: int = 0) -> tuple:
    """NVRTC/nvcc options of one module of flash_decode.cu; the CPU test compiles the same list with nvcc.
    ``tma``: DEC_TMA (``takes_tma``); ``w``: the attending warps (0: ``warps`` on sm_90)."""
    return ("-std=c++17", "--use_fast_math", f"-DCUSDPA_BF16={int(dtype_name == 'bfloat16')}", f"-DHEAD_DIM={E}",
            f"-DHEAD_DIM_V={Ev}", "-DIS_DROPOUT=0", f"-DDEC_WARPS={w or warps(E, Ev)}", f"-DDEC_TILE={TILE}",
            f"-DDEC_STAGES={DEPTH}", f"-DPAGED={int(paged)}", f"-DSOFTCAP={int(softcap)}",
            f"-DALIBI={int(alibi)}", f"-DDEC_MAX_SPLITS={MAX_SPLITS}", f"-DDEC_MERGE_UNROLL={MERGE_UNROLL}",
            *(("-DCUSDPA_PHASES=1",) if PHASES else ()), *(("-DDEC_TMA=1",) if tma else ()))


def choices(device: int, dtype_name: str, E: int, Ev: int, k_cache: Operand, paged: bool, softcap: bool,
            alibi: bool) -> tuple:
    """(attending warps, TMA blocks or not, compile options) of the split kernel for a call on ``device``: what
    ``build`` launches, and which module benchmarks/decode.py --phases reads."""
    w = warps(E, Ev, sources.shared_per_block(device))
    tma = takes_tma(E, Ev, k_cache, paged, sources.compute_capability(device), w)
    return w, tma, compile_options(dtype_name, E, Ev, paged, softcap, alibi, tma, w)


@functools.lru_cache(maxsize=256)
def build(device: int, dtype_name: str, q: Operand, k_cache: Operand, v_cache: Operand, capacity: int,
          table_row_stride: int, paged: bool, new: Operand | None, new_v: Operand | None, has_seqlens: bool,
          alibi: bool, window: tuple, scale: float, softcap: float) -> DecodePlan:
    """The plan of a call the kernels take (``applies``). ``capacity``: positions a sequence can hold;
    ``paged``: the ``table`` pointer is an int32 (B, blocks) block table of row stride ``table_row_stride``
    (else it is the contiguous cache's rows per sequence, int32 (B,), or 0 for rows 0..B-1); ``has_seqlens``:
    the lengths come as a device int32 (B,) array (else ``fixed_len`` of each run); ``window`` (left, right),
    -1 unbounded, causal folded in as right = 0."""
    import cupy

    B, Lq, Hq, E = q.shape
    block_size, Hkv, Ev = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    w, tma, options = choices(device, dtype_name, E, Ev, k_cache, paged, softcap > 0, alibi)
    smem = smem_bytes(E, Ev, w, tma)
    threads = (w + tma) * 32
    split_fn = sources.kernel(device, "flash_decode.cu", "flash_decode_split", options, smem)
    with cupy.cuda.Device(device):
        resident = cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(split_fn.ptr, threads, smem)
    splits = split_count(B * Hkv, capacity, max(1, resident) * sources.multiprocessors(device), w)
    cache_strides = (*map(np.int64, k_cache.strides[:3]), *map(np.int64, v_cache.strides[:3]))
    seqlens = Slot("seqlens") if has_seqlens else 0
    launches = []
    n_new = 0 if new is None else new.shape[1]
    if n_new:
        append = sources.kernel(device, "flash_decode.cu", "kv_cache_append", options, 0)
        launches.append(Launch(append, (B * n_new, 1), (128,), 0, [
            Slot("k"), Slot("v"), Slot("key"), Slot("value"), Slot("table"), seqlens, Slot("fixed_len"), Hkv, n_new,
            *map(np.int64, new.strides[:3]), *map(np.int64, new_v.strides[:3]), np.int64(table_row_stride),
            *cache_strides, block_size, capacity]))
    left, right = window
    partial = splits > 1
    arrivals = B * Hkv if partial else 0
    if arrivals:
        launches.append(ZeroWords("arrivals", arrivals))
    maps = [MapSlot("k", _cache_map(dtype_name, k_cache, E, w * TILE)),
            MapSlot("v", _cache_map(dtype_name, v_cache, Ev, w * TILE))] \
        if tma else []
    launches.append(Launch(split_fn, (splits, B * Hkv), (threads,), smem, [
        *maps, Slot("q"), Slot("k"), Slot("v"), Slot("table"), seqlens, Slot("slopes") if alibi else 0, Slot("o"),
        Slot("lse"), Slot("o_part") if partial else 0, Slot("ml_part") if partial else 0,
        Slot("arrivals") if arrivals else 0, B, Hq, Hq // Hkv, Lq,
        *map(np.int64, q.strides[:3]), np.int64(table_row_stride), *cache_strides, block_size, capacity,
        Slot("fixed_len"), n_new, np.float32(scale), np.float32(softcap), left, right]))
    rows = B * Hq * Lq
    kept = tuple(x for x in launches if not isinstance(x, ZeroWords))
    return DecodePlan(device, tuple(launches), kept, (B, Lq, Hq, Ev), (B, Hq, Lq),
                      splits * rows * Ev if partial else 0, splits * rows * 2 if partial else 0, arrivals, capacity, n_new)
