"""FLASH launches: the kernels' views of a problem's operands, the forward and backward launches built
from them, and the general path that runs them on CuPy arrays.

Inputs need only a unit last-dim stride, 16-byte-aligned rows and a batch layout that collapses to one
stride; anything else (and broadcast batch dims that do not collapse) is copied to a contiguous array
first. Kernels run on CuPy's current stream.
"""
from __future__ import annotations

import dataclasses
import heapq
import math
from dataclasses import dataclass

import numpy as np

from ... import reference
from ..launch import Launch, MapSlot, Slot, run, seed_values, values
from . import sources, tma
from .config import (FlashConfig, sm90_backward_applies, sm90_backward_is_wide, sm90_forward_applies,
                     sm90_wide_chunk, smem_bytes)

MAX_GRID_Y = 65535


# ---- operands ------------------------------------------------------------------------------------------

def usable(x) -> bool:
    """Unit last-dim stride, 16-byte aligned base and row strides: what cp.async and 16-byte stores need."""
    item = x.itemsize
    if x.ndim and x.shape[-1] > 1 and x.strides[-1] != item:
        return False
    return x.data.ptr % 16 == 0 and all(s % 16 == 0 for s, n in zip(x.strides[:-1], x.shape[:-1]) if n > 1)


def _collapse(strides, shape) -> int | None:
    """One stride for the flattened batch dims (row-major order), or None if they do not collapse."""
    dims = [(st, n) for st, n in zip(strides, shape) if n > 1]
    for (s_outer, _), (s_inner, n_inner) in zip(dims, dims[1:]):
        if s_outer != s_inner * n_inner:
            return None
    return dims[-1][0] if dims else 0


def _fresh(x):
    """A new C-contiguous copy: its own allocation is aligned, where ``ascontiguousarray`` would hand back
    a contiguous array whose base is not 16-byte aligned unchanged (cp.async then faults)."""
    import cupy

    return cupy.array(x, order="C", copy=True)


def _readable(x):
    """``x`` when the kernels can read it in place, else a fresh copy."""
    return x if usable(x) else _fresh(x)


def _dense_operand(x, batch_shape):
    """(array viewable as (*batch, H, R, D), flattened-batch stride in elements) for a dense operand."""
    import cupy

    x = x if x.ndim >= 3 else x[None]
    full = cupy.broadcast_to(x, batch_shape + x.shape[-3:])
    stride_b = _collapse(full.strides[:len(batch_shape)], batch_shape) if usable(x) else None
    if stride_b is None:
        full = _fresh(full)
        stride_b = _collapse(full.strides[:len(batch_shape)], batch_shape)
    return full, stride_b // full.itemsize


def kernel_strides(shape, strides, batch_ndim: int, itemsize: int) -> list[np.int64] | None:
    """(b, h, row) element strides of a dense (*batch, H, rows, dim) operand for the flattened batch index b,
    or None when the kernels cannot read it in place: its last dim not contiguous, a stride off the 16 bytes
    that cp.async moves, or batch dims that do not collapse to one stride."""
    if shape[-1] > 1 and strides[-1] != 1:
        return None
    if any(s * itemsize % 16 for s, n in zip(strides[:-1], shape[:-1]) if n > 1):
        return None
    stride_b = _collapse(strides[:batch_ndim], shape[:batch_ndim])
    if stride_b is None:
        return None
    return [np.int64(stride_b), np.int64(strides[batch_ndim]), np.int64(strides[batch_ndim + 1])]


def _strides(x, dims) -> list[np.int64]:
    return [np.int64(x.strides[d] // x.itemsize) for d in dims]


@dataclass
class Layout:
    """Kernel views of one problem: operands, batch count and the (b, h, row) strides of each."""

    q: object
    k: object
    v: object
    B: int
    cu_q: object
    cu_k: object
    strides: dict  # name -> (stride_b, stride_h, stride_row) in elements


def layout(pr) -> Layout:
    if pr.varlen is not None:
        q, k, v = (_readable(x) for x in (pr.q, pr.k, pr.v))
        strides = {n: [np.int64(0)] + _strides(x, (1, 0)) for n, x in (("q", q), ("k", k), ("v", v))}
        return Layout(q, k, v, pr.varlen.batch, pr.varlen.cu_seqlens_q, pr.varlen.cu_seqlens_k, strides)
    (q, sq), (k, sk), (v, sv) = (_dense_operand(x, pr.batch_shape) for x in (pr.q, pr.k, pr.v))
    nb = len(pr.batch_shape)
    strides = {n: [np.int64(sb)] + _strides(x, (nb, nb + 1)) for n, x, sb in (("q", q, sq), ("k", k, sk), ("v", v, sv))}
    null = np.uint64(0)
    return Layout(q, k, v, math.prod(pr.batch_shape), null, null, strides)


def _out_view(pr, lay, x, heads, rows, dim):
    """The kernels' view of a dense result or gradient operand and its (b, h, row) strides: ``x`` itself where
    ``kernel_strides`` serve (a token-major out, as the torch bridge allocates, is written in place), else
    a (B, H, rows, dim) reshape; a packed array as it is."""
    if pr.varlen is not None:
        return x, [np.int64(0)] + _strides(x, (1, 0))
    if usable(x):
        found = kernel_strides(x.shape, [st // x.itemsize for st in x.strides], x.ndim - 3, x.itemsize)
        if found is not None:
            return x, found
    v = x.reshape(lay.B, heads, rows, dim)
    return v, _strides(v, (0, 1, 2))


def _lse_strides(pr):
    if pr.varlen is not None:
        return [np.int64(0), np.int64(pr.q.shape[0])]
    return [np.int64(pr.hq * pr.L), np.int64(pr.L)]


def _common(pr, lay):
    return (lay.cu_q, lay.cu_k, np.int32(pr.L), np.int32(pr.S), np.int32(pr.hq), np.int32(pr.group))


def _visibility(pr):
    left, right = pr.window_bounds
    return np.int32(left), np.int32(right), np.int32(pr.lower_right)


def _dropout(pr):
    return (Slot("seed_lo"), Slot("seed_hi"), Slot("offset"), np.uint32(pr.keep_threshold),
            np.float32(pr.dropout_rescale))


def config(pr) -> FlashConfig:
    return FlashConfig.for_problem(pr.E, pr.Ev, pr.L, pr.causal, mask_kind(pr), bool(pr.softcap))


def mask_kind(pr) -> str | None:
    """The attn_mask as the Hopper forward's ATTN_MASK names it (sources.MASK_CODES): None, "bool" or a float
    mask's dtype."""
    if pr.mask is None:
        return None
    return "bool" if pr.mask_kind == "bool" else np.dtype(pr.mask.dtype).name


def mask_operand(pr):
    """(array, [b, h, row] element strides) of the attn_mask as the Hopper forward reads it: the caller's
    array in place, its broadcast dims at stride 0 (never expanded), keys contiguous, and every stride and
    the base a multiple of two elements (a thread reads its keys in pairs). Otherwise a copy whose rows
    have an even length, still unexpanded over heads and rows, and expanded over the batch dims only where
    they do not collapse to one stride."""
    import cupy

    nb, S = len(pr.batch_shape), pr.S
    full_shape = pr.batch_shape + (pr.hq, pr.L, S)
    m = pr.mask.reshape((1,) * (nb + 3 - pr.mask.ndim) + tuple(pr.mask.shape))

    def strides(x):
        full, pair = cupy.broadcast_to(x, full_shape), 2 * x.itemsize
        sb = _collapse(full.strides[:nb], pr.batch_shape)
        if (sb is None or x.data.ptr % pair or (S > 1 and full.strides[-1] != x.itemsize)
                or any(st % pair for st, n in zip(full.strides[:-1], full_shape[:-1]) if n > 1)):
            return None
        return [np.int64(st // x.itemsize) for st in (sb, full.strides[nb], full.strides[nb + 1])]

    found = strides(m)
    if found is None:
        shape = list(m.shape)
        if _collapse(cupy.broadcast_to(m, full_shape).strides[:nb], pr.batch_shape) is None:
            shape[:nb] = pr.batch_shape
        buf = cupy.zeros((*shape[:-1], S + S % 2), dtype=m.dtype)
        buf[..., :S] = m
        m = buf[..., :S]
        found = strides(m)
    return m, found


@dataclass(frozen=True)
class MaskSummary:
    """How the Hopper kernels read an attn_mask whose operand (``mask_operand``) has element strides
    ``strides``: one pass over it on the GPU (kernels_cuda/mask_summary.cu) writes the keys some query row
    attends (a byte per (mask batch, mask head, key), rows of ``pitch`` bytes, the padding marked seen: the
    kernels zero the K and V rows of the others) and the forward's block summary (int8 per (mask batch, mask
    head, query block of ``block_m`` rows, key block of ``block_n``): 0 = nothing attended, 2 = every visible
    pair attended (bool masks), else 1, plus 4 where a key of the tile is attended by none of its rows and 8
    where a float mask holds -inf at a visible pair of the tile).
    The launches take slots mask, seen and blocks, buffers of ``seen_bytes`` and ``blocks_bytes`` the caller
    allocates (or reuses, while the mask is unchanged: ``mask_values``). Forward and backward read the same
    summary: the forward its blocks and seen keys, the backward its seen keys (and, with
    ``FlashConfig.bwd90_mask_blocks``, its blocks)."""

    strides: tuple
    batches: int  # mask batch x mask heads it holds
    heads: int
    rows: int  # the mask's rows: 1 where they broadcast (one query block; visibility left to the kernels)
    block_m: int
    block_n: int
    pitch: int

    @staticmethod
    def of(pr, strides, block_m: int, block_n: int) -> "MaskSummary":
        sb, sh, sm = (int(x) for x in strides)
        heads = pr.hq if sh else 1
        rows = pr.L if sm else 1
        return MaskSummary(tuple(strides), (math.prod(pr.batch_shape) if sb else 1) * heads, heads, rows,
                           block_m if rows > 1 else 1, block_n, -(-pr.S // 16) * 16)

    @property
    def seen_bytes(self) -> int:
        return self.batches * self.pitch

    def taken_at(self, S: int) -> int:
        """Where the forward's tile counter (two int32, flash_fwd_sm90.cu's TileQueue) sits in the blocks buffer,
        after the block summary: it shares the summary's lifetime and stream, and the summary pass zeroes it."""
        return -(-self.batches * -(-self.rows // self.block_m) * -(-S // self.block_n) // 8) * 8

    def blocks_bytes(self, S: int) -> int:
        return self.taken_at(S) + 8

    def launches(self, pr, skip: bool = True) -> list:
        """The seen buffer's and the tile counter's initialisation, and the summary pass (every block marked
        partial where ``skip`` is off, its holes kept; none without keys)."""
        opts = ("-std=c++17", f"-DATTN_MASK={sources.MASK_CODES[mask_kind(pr)]}")
        init = sources.kernel(device(pr), "mask_summary.cu", "mask_seen_init", opts, 0)
        fn = sources.kernel(device(pr), "mask_summary.cu", "mask_summary", opts, 0)
        out = [Launch(init, (max(1, -(-self.seen_bytes // 256)), 1), (256,), 0,
                      (Slot("seen"), np.int64(self.seen_bytes), np.int64(self.pitch), np.int32(pr.S), Slot("blocks"),
                       np.int64(self.taken_at(pr.S))))]
        n_m, n_n = -(-self.rows // self.block_m), -(-pr.S // self.block_n)
        if n_m and n_n:
            out.append(Launch(fn, (n_m * n_n, self.batches), (256,), 0,
                              (Slot("mask"), *self.strides, np.int32(self.heads), np.int32(self.rows), np.int32(pr.L),
                               np.int32(pr.S), *_visibility(pr), np.int32(self.block_m), np.int32(self.block_n),
                               np.int32(n_n), Slot("blocks"), Slot("seen"),
                               np.int64(self.pitch), np.int32(skip))))
        return out

    def seen_args(self) -> tuple:
        """The kernels' arguments for the seen keys: the slot, its (b, h) strides in bytes."""
        several = self.batches > self.heads
        return (Slot("seen"), np.int64(self.heads * self.pitch if several else 0),
                np.int64(self.pitch if self.heads > 1 else 0))

    def block_args(self, S: int) -> tuple:
        """The Hopper forward's arguments for the block summary: the slot, its (b, h, query block) strides."""
        n_m, n_n = -(-self.rows // self.block_m), -(-S // self.block_n)
        several = self.batches > self.heads
        return (Slot("blocks"), np.int64(self.heads * n_m * n_n if several else 0),
                np.int64(n_m * n_n if self.heads > 1 else 0), np.int64(n_n if self.rows > 1 else 0))


def _modified_options(pr, cfg, mask_grad: bool = False, queue: bool = False, tma_store: bool = False,
                      scheduled: bool = False) -> tuple:
    """The Hopper kernels' compile options with ``pr``'s attn_mask and score modifiers (and, ``mask_grad``,
    the backward storing a float mask's gradient; ``queue``, the forward taking tiles from a counter;
    ``tma_store``, the forward storing O with TMA; ``scheduled``, its tiles dealt by the host's schedule)."""
    return sources.compile_options(pr.dtype_name, pr.E, pr.Ev, pr.dropout_p > 0, cfg, mask=mask_kind(pr),
                                   alibi=pr.alibi_slopes is not None, softcap=bool(pr.softcap), mask_grad=mask_grad,
                                   queue=queue, tma_store=tma_store, scheduled=scheduled)


def sm90_forward_config(pr) -> FlashConfig:
    """``config(pr)`` as the Hopper forward takes it: a packed batch stores O from registers (a TMA store clips
    at the tensor's end, not at a sequence's), and a configuration given knobs by hand is fitted to shared
    memory as ``FlashConfig.for_problem`` fits its own."""
    cfg = config(pr)
    if cfg.fwd90_tma_store and pr.varlen is not None:
        cfg = dataclasses.replace(cfg, fwd90_tma_store=False)
    if cfg.fwd90_cluster > 1 and not _clusters_apply(pr, cfg):
        cfg = dataclasses.replace(cfg, fwd90_cluster=1)
    if cfg.fwd90_split_last and (cfg.fwd90_cluster > 1 or pr.mask is not None):  # (flash_fwd_sm90.cu's rule)
        cfg = dataclasses.replace(cfg, fwd90_split_last=False)
    return cfg.fitted(pr.E, pr.Ev)


def _clusters_apply(pr, cfg) -> bool:
    """Whether the CTAs of a cluster of ``cfg.fwd90_cluster`` can take neighbouring query blocks of one head and
    walk the same key blocks (kernels_cuda/flash_fwd_sm90.cu, FWD90_CLUSTER): every query sees every key (no
    causal band, window or attn_mask), a dense batch on the persistent grid, whole units of query blocks, and
    key blocks whose share per CTA is whole groups of 8 rows (the swizzle's)."""
    num_m = -(-pr.L // (64 * cfg.fwd90_warpgroups))
    return (pr.mask is None and pr.window_bounds == (-1, -1) and pr.varlen is None and cfg.fwd90_persistent
            and num_m % cfg.fwd90_cluster == 0 and cfg.fwd90_block_n % (8 * cfg.fwd90_cluster) == 0)


def sm90_forward_options(pr) -> tuple:
    """The compile options of the Hopper forward's module for ``pr`` (benchmarks/fwd90_phases.py reads
    the phase clocks of that module)."""
    cfg = sm90_forward_config(pr)
    return _modified_options(pr, cfg, queue=_queued(pr, cfg), tma_store=cfg.fwd90_tma_store,
                             scheduled=_scheduled(pr, cfg)) + ("-arch=sm_90a",)


def _scheduled(pr, cfg) -> bool:
    """Whether the Hopper forward's tiles of ``pr`` are dealt by the host's schedule (``_tile_schedule``)."""
    return deals_by_schedule(cfg, pr.varlen is not None, _queued(pr, cfg))


def deals_by_schedule(cfg, packed: bool, queued: bool) -> bool:
    """The rule of ``_scheduled`` (benchmarks/sass.py and the compile tests build by it too): a dense batch on the
    persistent grid, without clusters (which deal their units round-robin) or a queue."""
    return cfg.fwd90_schedule and cfg.fwd90_persistent and cfg.fwd90_cluster == 1 and not packed and not queued


def _queued(pr, cfg) -> bool:
    """Whether the Hopper forward's CTAs take their tiles from a counter (flash_fwd_sm90.cu's TileQueue): a
    masked problem's (the counter beside its summary) and, with ``cfg.fwd90_queue_varlen``, a packed batch's
    (a counter of the call's own, in slot blocks)."""
    return pr.mask is not None or (pr.varlen is not None and cfg.fwd90_queue_varlen and cfg.fwd90_persistent)


def _modifier_args(pr) -> tuple:
    """The Hopper kernels' last arguments: ALiBi's (``_alibi_args``), then the softcap (0: none)."""
    return (*_alibi_args(pr), np.float32(pr.softcap))


def _alibi_args(pr) -> tuple:
    """ALiBi's slopes as the Hopper kernels read them: float32 per (flattened batch or sequence, query head),
    heads contiguous, and the batch stride in elements (0: one slope per head for every batch), or zeros.
    A copy: the slopes are a few floats."""
    if pr.alibi_slopes is None:
        return np.uint64(0), np.int64(0)
    xp, x = pr.xp, pr.alibi_slopes
    if x.ndim == 1:
        return xp.ascontiguousarray(x, dtype=np.float32), np.int64(0)
    lead = (pr.varlen.batch,) if pr.varlen is not None else tuple(pr.batch_shape)
    full = xp.broadcast_to(x, lead + (pr.hq,)).reshape(-1, pr.hq)
    return xp.ascontiguousarray(full, dtype=np.float32), np.int64(pr.hq)


NO_MASK = (np.uint64(0), *(np.int64(0),) * 3, np.uint64(0), *(np.int64(0),) * 2, np.uint64(0), *(np.int64(0),) * 4)


def mask_values(pr, operand, summary: MaskSummary, skip: bool = True) -> tuple[dict, list]:
    """(slot values, launches) of a masked call: the mask operand and the seen and blocks buffers of its
    summary, and the launches that must run before the kernels that read them: the summary pass into fresh
    buffers, or nothing where the mask came as a BlockMask that already holds this summary (same tiles,
    same ``skip``, same stream: another stream would not be ordered after the pass)."""
    import cupy

    stream = cupy.cuda.get_current_stream().ptr
    key = (summary, skip, stream)
    held = pr.mask_summaries.get(key) if pr.mask_summaries is not None else None
    first = []
    if held is None:
        held = (cupy.empty(summary.seen_bytes, dtype=np.uint8),
                cupy.empty(max(summary.blocks_bytes(pr.S), 1), dtype=np.int8))
        first = summary.launches(pr, skip)
        if pr.mask_summaries is not None:
            pr.mask_summaries[key] = held
    return {"mask": operand, "seen": held[0], "blocks": held[1]}, first


def device(pr) -> int:
    return pr.q.device.id


# ---- launches -----------------------------------------------------------------------------------------

def mask_summary(pr, strides) -> MaskSummary:
    """The MaskSummary of an attn_mask operand with element strides ``strides``, in the Hopper forward's
    tiles, which the backward reads too (its seen keys; its blocks with ``FlashConfig.bwd90_mask_blocks``)."""
    cfg = config(pr)
    return MaskSummary.of(pr, strides, 64 * cfg.fwd90_warpgroups, cfg.fwd90_block_n)


def forward_launches(pr, lay, o_strides, mask_strides=None) -> list[Launch]:
    """The forward's launches of ``pr``: slots q, k, v, o, lse, the seed and, with an attn_mask (whose
    operand has element strides ``mask_strides``), mask, seen and blocks, which its summary writes first
    (``mask_values``); a packed batch whose tiles a counter deals (``_queued``) takes that counter, two zeroed
    int32, in slot blocks. None when there is nothing to do."""
    if lay.B * pr.hq == 0 or pr.L == 0:
        return []
    cfg, dev = config(pr), device(pr)
    opts = sources.compile_options(pr.dtype_name, pr.E, pr.Ev, pr.dropout_p > 0, cfg)
    tail = (*_lse_strides(pr), np.float32(pr.scale * math.log2(math.e)), *_visibility(pr), *_dropout(pr))
    if sm90_forward_applies(pr.E, pr.Ev, sources.compute_capability(dev), cfg):
        cfg, opts = sm90_forward_config(pr), sm90_forward_options(pr)
        queued = _queued(pr, cfg)
        if pr.mask is None:  # (a queued packed batch: its counter in slot blocks)
            args = (*NO_MASK[:7], Slot("blocks"), *NO_MASK[8:]) if queued else NO_MASK
            return [_sm90_forward_launch(pr, lay, o_strides, cfg, opts, tail, args)]
        summary = mask_summary(pr, mask_strides)
        mask = (Slot("mask"), *mask_strides, *summary.seen_args(), *summary.block_args(pr.S),
                np.int64(summary.taken_at(pr.S)))
        return [_sm90_forward_launch(pr, lay, o_strides, cfg, opts, tail, mask)]
    if pr.mask is not None or pr.alibi_slopes is not None or pr.softcap:  # environment_reasons keeps dispatch
        raise NotImplementedError(  # away; a direct call must not drop them
            "FLASH takes an attn_mask, ALiBi and soft-capping on the Hopper kernels only")
    smem, block_m, threads = smem_bytes("fwd", cfg, pr.E, pr.Ev), cfg.fwd_block_m, cfg.fwd_warps * 32
    fn = sources.kernel(dev, "flash_fwd.cu", "flash_fwd", opts, smem)
    grid = ((pr.L + block_m - 1) // block_m, lay.B * pr.hq)
    args = (Slot("q"), Slot("k"), Slot("v"), Slot("o"), Slot("lse"), *_common(pr, lay), *lay.strides["q"],
            *lay.strides["k"], *lay.strides["v"], *o_strides, *tail)
    return [Launch(fn, grid, (threads,), smem, args)]


L2_SHARE = 24 << 20  # bytes of K and V that the heads of one tile chunk keep in L2 (half the H200's 50 MB)


def _sm90_forward_launch(pr, lay, o_strides, cfg, opts, tail, mask) -> Launch:
    """The persistent Hopper forward: TMA maps of q, k and v, one CTA per SM over the (head, query block)
    tiles (see kernels_cuda/flash_fwd_sm90.cu); ``mask``: its attn_mask arguments (NO_MASK: none)."""
    dev = device(pr)
    smem = smem_bytes("fwd_sm90", cfg, pr.E, pr.Ev)
    block_m, block_n = 64 * cfg.fwd90_warpgroups, cfg.fwd90_block_n
    fn = sources.kernel(dev, "flash_fwd_sm90.cu", "flash_fwd_sm90", opts, smem)
    packed = pr.varlen is not None
    maps = []
    cluster = cfg.fwd90_cluster  # (with 2, each CTA of a cluster loads half of each K and V block's rows)
    for name, x, D, rows, heads, box in (("q", lay.q, pr.E, pr.L, pr.hq, block_m),
                                         ("k", lay.k, pr.E, pr.S, pr.hkv, block_n // cluster),
                                         ("v", lay.v, pr.Ev, pr.S, pr.hkv, block_n // cluster)):
        if packed:
            rows = x.shape[0]
        tensor_map, hm, bm = tma.operand_map(pr.dtype_name, x.data.ptr, D, rows, heads, 1 if packed else lay.B,
                                             lay.strides[name], box)
        maps.append((MapSlot(name, tensor_map), np.int32(hm), np.int32(bm)))
    store = ()  # O's map, boxes of a warpgroup's 64 rows (cfg.fwd90_tma_store, dense only)
    if cfg.fwd90_tma_store:
        o_map, hm, bm = tma.operand_map(pr.dtype_name, tma.ANY_ADDRESS, pr.Ev, pr.L, pr.hq, lay.B, o_strides, 64)
        store = (MapSlot("o", o_map), np.int32(hm), np.int32(bm))
    BH, num_m = lay.B * pr.hq, (pr.L + block_m - 1) // block_m
    kv_bytes_per_head = max(pr.S, 1) * (pr.E + pr.Ev) * 2 / pr.group
    chunk_heads = int(min(BH, max(1, L2_SHARE // kv_bytes_per_head)))
    if cluster > 1:  # as many clusters as run at once (a CTA an SM), each taking units of `cluster` query blocks;
        # no schedule (every tile the same work)
        grid = (cluster * min(BH * num_m // cluster, sources.multiprocessors(dev) // cluster,
                              sources.max_active_clusters(dev, fn, cluster, 128 * (cfg.fwd90_warpgroups + 1), smem)), 1)
        schedule = 0
    else:
        grid = (min(BH * num_m, sources.multiprocessors(dev)) if cfg.fwd90_persistent else BH * num_m, 1)
        schedule = 0 if not _scheduled(pr, cfg) else \
            _tile_schedule(pr, dev, BH, num_m, chunk_heads, grid[0], block_m, block_n,
                           cfg.fwd90_warpgroups if cfg.fwd90_split_last else 1)
    args = (*(m for m, _, _ in maps), *store, Slot("o"), Slot("lse"), *_common(pr, lay),
            *(x for _, hm, bm in maps for x in (hm, bm)), *o_strides, *tail, np.int32(BH), np.int32(num_m),
            np.int32(chunk_heads), schedule, *mask, *_modifier_args(pr))
    return Launch(fn, grid, (128 * (cfg.fwd90_warpgroups + 1),), smem, args)


_schedules: dict = {}  # the key of a dense forward's tiles -> its schedule on the device


def _tile_schedule(pr, dev, BH, num_m, chunk_heads, grid, block_m, block_n, split: int = 1):
    """The persistent Hopper forward's tiles per CTA for a dense problem (kernels_cuda/flash_fwd_sm90.cu,
    `schedule`): ``deal_tiles`` of the key blocks each query block sees, made once per shape and kept on the
    device (a Launch keeps its own alive). ``split``: the consumer warpgroups that share a split tile's key blocks
    (FlashConfig.fwd90_split_last; 1: none), whose work counts as that share. Each tile decoded (``decoded_tiles``)."""
    import cupy

    left, right = pr.window_bounds
    key = (dev, BH, num_m, chunk_heads, grid, block_m, block_n, pr.L, pr.S, left, right, pr.lower_right, split,
           pr.hq, pr.group)
    found = _schedules.get(key)
    if found is None:
        schedule = deal_tiles(tile_work(pr, num_m, block_m, block_n, split), BH, chunk_heads, grid)
        with cupy.cuda.Device(dev):
            found = cupy.asarray(decoded_tiles(schedule, grid, BH, num_m, chunk_heads, pr.hq, pr.group))
        if len(_schedules) >= 64:
            _schedules.clear()
        _schedules[key] = found
    return found


def tile_work(pr, num_m: int, block_m: int, block_n: int, split: int = 1) -> np.ndarray:
    """The key blocks each query block of ``pr``'s dense slices sees (a tile's work for ``deal_tiles``); with
    ``split`` > 1 warpgroups sharing a split tile's key blocks (FlashConfig.fwd90_split_last), the last query
    block's count is its share where its rows fill one warpgroup (64 rows) only."""
    lo, hi = reference.row_key_bounds(pr.L, pr.S, pr.causal, pr.lower_right, pr.window)
    pad = num_m * block_m - pr.L  # rows past L see nothing
    lo = np.concatenate([lo, np.full(pad, pr.S)]).reshape(num_m, block_m)
    hi = np.concatenate([hi, np.zeros(pad, dtype=hi.dtype)]).reshape(num_m, block_m)
    seen = lo < hi
    first = np.where(seen, lo, pr.S).min(axis=1) // block_n
    end = -(-np.where(seen, hi, 0).max(axis=1) // block_n)
    blocks = np.maximum(end - first, 0)
    if split > 1 and pr.L - (num_m - 1) * block_m <= 64:
        blocks[-1] = -(-blocks[-1] // split)
    return blocks


def _tile_at(tiles: np.ndarray, BH: int, num_m: int, chunk_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """(batch * head, query block) of each of the Hopper forward's tile indices, in its tile_at's order: heads in
    chunks of ``chunk_heads``, within a chunk the query blocks from the last, heads innermost."""
    per_chunk = chunk_heads * num_m
    chunk, rem = tiles // per_chunk, tiles % per_chunk
    heads = np.minimum(chunk_heads, BH - chunk * chunk_heads)
    return chunk * chunk_heads + rem % heads, num_m - 1 - rem // heads


def deal_tiles(key_blocks, BH: int, chunk_heads: int, grid: int) -> np.ndarray:
    """The Hopper forward's tiles dealt to ``grid`` CTAs: its tile list (tile_at's order: heads in chunks,
    query blocks from the last, heads innermost) given in turn to the CTA with the least work so far, a
    tile's work being the key blocks its query block sees (``key_blocks``, one per query block) plus one
    (its Q load, first and last products and epilogue). Under a causal band the kernel's round-robin deal
    gave CTA 0 the heaviest tile of every round: by this count the busiest CTA had 1.15-1.20x the average
    at E = 128, dealt this way 1.04. int32: grid + 1 offsets, then the tiles CTA by CTA, each in list
    order."""
    num_m = len(key_blocks)
    tiles = np.arange(BH * num_m)
    work = np.asarray(key_blocks)[_tile_at(tiles, BH, num_m, chunk_heads)[1]] + 1
    loads = [(0, c) for c in range(grid)]
    owner = np.empty(len(tiles), dtype=np.int64)
    for t, w in enumerate(work.tolist()):
        load, c = heapq.heappop(loads)
        owner[t] = c
        heapq.heappush(loads, (load + w, c))
    order = np.argsort(owner, kind="stable")
    offsets = np.searchsorted(owner[order], np.arange(grid + 1))
    return np.concatenate([offsets, order]).astype(np.int32)


def decoded_tiles(schedule: np.ndarray, grid: int, BH: int, num_m: int, chunk_heads: int, Hq: int,
                  group: int) -> np.ndarray:
    """``deal_tiles``' schedule with each tile decoded (``_tile_at``, as the kernel's tile_at decodes a tile index;
    the kernel's FWD90_SCHEDULE reads it so): the grid + 1 offsets, zeros up to a multiple of 4 words (16-byte
    entries), then per tile (batch, query head, kv head, query block). int32."""
    offsets, tiles = schedule[:grid + 1], schedule[grid + 1:].astype(np.int64)
    bh, m = _tile_at(tiles, BH, num_m, chunk_heads)
    b, h = bh // Hq, bh % Hq
    entries = np.stack([b, h, h // group, m], axis=1)
    head = np.zeros(-(-(grid + 1) // 4) * 4, dtype=np.int64)
    head[:grid + 1] = offsets
    return np.concatenate([head, entries.reshape(-1)]).astype(np.int32)


def _dq_blocks(pr, cfg) -> tuple[int, int, int]:
    """(blocks, batch stride, head stride) of the Hopper backward's blocked dQ accumulator, in blocks of
    bwd90_block_m query rows (Slice::query_block): dense, ceil(L / block) per (batch, head); packed, per
    head the tokens' blocks plus one per sequence (each sequence starts a fresh block)."""
    bm = cfg.bwd90_block_m
    if pr.varlen is not None:
        per_head = (pr.q.shape[0] + pr.varlen.batch * bm) // bm
        return pr.hq * per_head, 0, per_head
    per_head = -(-pr.L // bm)
    return math.prod(pr.batch_shape) * pr.hq * per_head, pr.hq * per_head, per_head


def _dq_copies(pr, deterministic: bool) -> int:
    """Copies of the dQ accumulator: two for the wide Hopper kernel's deterministic mode, where even and odd
    key blocks add in two orders of their own, so that the blocks adding into one copy one after another
    are two steps apart rather than one, which covers a reduction's round trip (one copy: 0.72-0.84x the
    default's speed at E = 192/256); flash_bwd_dq_convert adds them in a fixed order."""
    return 2 if deterministic and sm90_backward_is_wide(pr.E, pr.Ev) else 1


def dq_accum_elements(pr, deterministic: bool) -> int:
    """4-byte elements of the workspace (slot dq_accum) the backward of ``pr`` needs, 0 for none: on the
    Hopper kernels the blocked fp32 dQ accumulator (``_dq_copies`` of it), and for a ``deterministic`` one
    a semaphore per block of each copy after them."""
    cfg = config(pr)
    if not sm90_backward_applies(pr.E, pr.Ev, sources.compute_capability(device(pr)), cfg):
        return 0
    blocks = _dq_blocks(pr, cfg)[0]
    return _dq_copies(pr, deterministic) * (blocks * cfg.bwd90_block_m * pr.E + (blocks if deterministic else 0))


def backward_launches(pr, lay, strides, deterministic: bool = False, mask_strides=None,
                      mask_grad: bool = False) -> list[Launch]:
    """The backward kernels of ``pr`` in launch order, with slots q, k, v, o, do, lse, delta, dq, dk, dv,
    dq_accum (where ``dq_accum_elements``), the seed and, with an attn_mask (whose operand has element
    strides ``mask_strides``), mask, seen and blocks (written first by its summary: ``mask_values``);
    ``strides`` holds the (b, h, row) strides of o, do, dq, dk and dv. ``mask_grad``: the Hopper backward
    stores dS into slot dmask, a zeroed float32 (batch..., Hq, L, S) buffer (``backward`` sums it to the
    mask's shape)."""
    if lay.B * pr.hq == 0:
        return []
    cfg, dev = config(pr), device(pr)
    hopper = sm90_backward_applies(pr.E, pr.Ev, sources.compute_capability(dev), cfg)
    blocks, acc_sb, acc_sh = _dq_blocks(pr, cfg) if hopper else (0, 0, 0)
    # the accumulator, where its semaphores start (-1: none), where its second copy starts (0: none), its
    # block strides
    copies, size = _dq_copies(pr, deterministic), blocks * cfg.bwd90_block_m * pr.E
    accum = (Slot("dq_accum") if hopper else 0, np.int64(copies * size if deterministic else -1),
             np.int64(size if copies == 2 else 0), np.int64(acc_sb), np.int64(acc_sh))
    vis = _visibility(pr)
    drop = _dropout(pr)
    scale, scale_log2 = np.float32(pr.scale), np.float32(pr.scale * math.log2(math.e))
    parts = (1, 2) if cfg.split_dkdv else (3,)
    qkv = (Slot("q"), Slot("k"), Slot("v"))
    ranks = (*_common(pr, lay), *lay.strides["q"], *lay.strides["k"], *lay.strides["v"], *strides["do"])

    def opts(part=3):
        return sources.compile_options(pr.dtype_name, pr.E, pr.Ev, pr.dropout_p > 0, cfg, part)

    launches = []
    if pr.L:
        rows = 64
        pre = sources.kernel(dev, "flash_bwd.cu", "flash_bwd_preprocess", opts(parts[0]), 0)
        launches.append(Launch(pre, ((pr.L + rows - 1) // rows, lay.B * pr.hq), (256,), 0,
                               (Slot("o"), Slot("do"), Slot("delta"), *accum[:2], *_common(pr, lay)[:5], *strides["o"],
                                *strides["do"], *accum[2:], *_lse_strides(pr), *vis, np.int32(rows))))
    if hopper:
        mask, walk = NO_MASK[:7], (np.uint64(0), *(np.int64(0),) * 3, np.int32(1), np.int32(1))
        if pr.mask is not None:
            summary = mask_summary(pr, mask_strides)
            mask = (Slot("mask"), *mask_strides, *summary.seen_args())
            if cfg.bwd90_mask_blocks and cfg.fwd90_mask_blocks and not deterministic:  # steps skipped (StepWalk)
                walk = (*summary.block_args(pr.S), np.int32(summary.block_m), np.int32(summary.block_n))
        tail = (scale, scale_log2, *vis, *drop, *mask, *walk, *_modifier_args(pr),
                Slot("dmask") if mask_grad else np.uint64(0))
        if pr.S:
            main = _modified_options(pr, cfg, mask_grad)
            launches.append(_sm90_backward_launch(pr, lay, strides, cfg, main, tail, accum, deterministic))
        if pr.L:
            fn = sources.kernel(dev, _sm90_backward_source(pr), "flash_bwd_dq_convert", opts() + ("-arch=sm_90a",), 0)
            bm = cfg.bwd90_block_m
            launches.append(Launch(fn, ((pr.L + bm - 1) // bm, lay.B * pr.hq), (256,), 0,
                                   (Slot("dq_accum"), Slot("dq"), *_common(pr, lay)[:5], *accum[2:], *strides["dq"],
                                    scale, *vis)))
        return launches
    if pr.mask is not None or pr.alibi_slopes is not None or pr.softcap:
        raise NotImplementedError("FLASH takes an attn_mask, ALiBi and soft-capping on the Hopper kernels only")
    if pr.S:
        grid = ((pr.S + cfg.bwd_block_n - 1) // cfg.bwd_block_n, lay.B * pr.hkv)
        smem = smem_bytes("dkdv", cfg, pr.E, pr.Ev)
        for part in parts:
            fn = sources.kernel(dev, "flash_bwd.cu", "flash_bwd_dkdv", opts(part), smem)
            launches.append(Launch(fn, grid, (cfg.bwd_warps * 32,), smem,
                                   (*qkv, Slot("do"), Slot("lse"), Slot("delta"), Slot("dk"), Slot("dv"), *ranks,
                                    *strides["dk"], *strides["dv"], *_lse_strides(pr), scale, scale_log2, *vis,
                                    *drop)))
    if pr.L:
        smem = smem_bytes("dq", cfg, pr.E, pr.Ev)
        fn = sources.kernel(dev, "flash_bwd.cu", "flash_bwd_dq", opts(parts[0]), smem)
        grid = ((pr.L + cfg.dq_block_m - 1) // cfg.dq_block_m, lay.B * pr.hq)
        launches.append(Launch(fn, grid, (cfg.dq_warps * 32,), smem,
                               (*qkv, Slot("do"), Slot("lse"), Slot("delta"), Slot("dq"), *ranks, *strides["dq"],
                                *_lse_strides(pr), scale, scale_log2, *vis, *drop)))
    return launches


def _sm90_backward_source(pr) -> str:
    return "flash_bwd_sm90_wide.cu" if sm90_backward_is_wide(pr.E, pr.Ev) else "flash_bwd_sm90.cu"


def _sm90_backward_launch(pr, lay, strides, cfg, opts, tail, accum, deterministic) -> Launch:
    """The Hopper backward kernel (kernels_cuda/flash_bwd_sm90.cu: one CTA per 128 keys of each (batch, kv
    head); flash_bwd_sm90_wide.cu for head dims above 128: 64 keys), writing dk and dv and adding dQ into
    the accumulator ``accum``: its slot, semaphore offset, second copy and block strides, with TMA maps of
    q, k, v and do (do's encoded at q's address, rewritten per call) in the column chunks of the kernel's
    swizzles (the wide kernel's chunks divide each warpgroup's half of a head dim). Key blocks start their query loops
    rotated where every query sees every key (the kernel checks that) and ``cfg.bwd90_rotate``. In
    deterministic mode key blocks wait on each other: rotated only while all key blocks of a slice fit on
    the device at once, and launched in the order they add in (descending) under a causal or window band
    or where they do not fit. (Heaviest first under a band made a slice's blocks start one after another
    as the last slice's finished, each reaching a query block just as the next-lower block did and then
    waiting for it: 0.60x the default at E = 64, L = 16384.)"""
    dev = device(pr)
    wide = sm90_backward_is_wide(pr.E, pr.Ev)
    block_n = 64 if wide else 128
    smem = smem_bytes("bwd_sm90", cfg, pr.E, pr.Ev)
    source = _sm90_backward_source(pr)
    fn = sources.kernel(dev, source, source[:-3], opts + ("-arch=sm_90a",), smem)
    packed = pr.varlen is not None
    q_rows, k_rows = (pr.q.shape[0], pr.k.shape[0]) if packed else (pr.L, pr.S)
    maps = []
    for name, ptr, D, rows, heads, box, st in (
            ("q", lay.q.data.ptr, pr.E, q_rows, pr.hq, cfg.bwd90_block_m, lay.strides["q"]),
            ("k", lay.k.data.ptr, pr.E, k_rows, pr.hkv, block_n, lay.strides["k"]),
            ("v", lay.v.data.ptr, pr.Ev, k_rows, pr.hkv, block_n, lay.strides["v"]),
            ("do", lay.q.data.ptr, pr.Ev, q_rows, pr.hq, cfg.bwd90_block_m, strides["do"])):
        cols = sm90_wide_chunk(D) if wide else None
        tensor_map, hm, bm = tma.operand_map(pr.dtype_name, ptr, D, rows, heads, 1 if packed else lay.B, st, box,
                                             cols)
        maps.append((MapSlot(name, tensor_map), np.int32(hm), np.int32(bm)))
    multipliers = tuple(x for _, hm, bm in maps for x in (hm, bm))
    key_blocks = -(-pr.S // block_n)
    co_resident = key_blocks <= sources.multiprocessors(dev)
    rotate = cfg.bwd90_rotate and (not deterministic or co_resident)
    banded = max(pr.window_bounds) >= 0
    descending = deterministic and (banded or not co_resident)
    args = (*(m for m, _, _ in maps), Slot("lse"), Slot("delta"), Slot("dk"), Slot("dv"), *accum[:2],
            np.int32(rotate), np.int32(descending), *_common(pr, lay), *multipliers, *strides["dk"], *strides["dv"],
            *accum[2:], *_lse_strides(pr), *tail)
    return Launch(fn, (key_blocks, lay.B * pr.hkv), (384,), smem, args)


# ---- the general path ------------------------------------------------------------------------------

def forward(pr, out=None, lse=None):
    import cupy

    with cupy.cuda.Device(device(pr)):
        res_out = out if out is not None and (pr.varlen is None or out.flags.c_contiguous) and usable(out) and \
            kernel_strides(out.shape, [st // out.itemsize for st in out.strides], out.ndim - 3, out.itemsize) else \
            cupy.empty(pr.out_shape, dtype=pr.dtype)
        res_lse = lse if lse is not None and lse.flags.c_contiguous else cupy.empty(pr.lse_shape, dtype=np.float32)
        if res_out.size or res_lse.size:
            lay = layout(pr)
            o_view, o_strides = _out_view(pr, lay, res_out, pr.hq, pr.L, pr.Ev)
            mask = mask_operand(pr) if pr.mask is not None else None
            fwd = forward_launches(pr, lay, o_strides, mask and mask[1])
            if fwd:
                extra, first = mask_values(pr, mask[0], mask_summary(pr, mask[1]), config(pr).fwd90_mask_blocks) \
                    if mask else ({}, [])
                if not mask and _queued(pr, config(pr)):  # a packed batch's tile counter, zeroed
                    extra["blocks"] = cupy.zeros(2, dtype=np.int32)
                run(first + fwd, values(q=lay.q, k=lay.k, v=lay.v, o=o_view, lse=res_lse, **seed_values(pr.seed, pr.offset),
                                **extra), cupy.cuda.get_current_stream().ptr, device(pr))
        for dst, src in ((out, res_out), (lse, res_lse)):
            if dst is not None and dst is not src:
                cupy.copyto(dst, src)
        return (out if out is not None else res_out), (lse if lse is not None else res_lse)


def backward(pr, out, lse, dout, deterministic=False, grads=None):
    """dq, dk, dv. The Hopper kernel adds dQ up with fp32 bulk reductions from every key block, whose order
    (and so dQ's last bits) varies run to run unless ``deterministic`` orders them; every other kernel sums
    in a fixed order."""
    import cupy

    from ...reference import sum_to_shape

    # A mask's backward runs on the Hopper kernels (mask_bits, mask_values in kernels_cuda/bwd_sm90.cuh); a
    # float mask's gradient where asked for (a fourth array given; with none given, wherever backward_reasons
    # allow it, as dispatch chose FLASH for it) comes from dS stored by the kernel, summed here over the
    # dims the mask broadcasts.
    lacking = backward_reasons(pr, True)  # (nothing unless the mask is float)
    mask_grad = pr.mask_kind == "float" and (not lacking if grads is None else len(grads) > 3)
    if mask_grad and lacking:
        raise NotImplementedError("; ".join(lacking))

    with cupy.cuda.Device(device(pr)):
        if pr.varlen is not None:
            full = (pr.q.shape, pr.k.shape, pr.v.shape)
        else:
            bs = pr.batch_shape
            full = (bs + (pr.hq, pr.L, pr.E), bs + (pr.hkv, pr.S, pr.E), bs + (pr.hkv, pr.S, pr.Ev))
        inputs = (pr.q, pr.k, pr.v)
        # Write straight into the caller's arrays when they have the kernels' layout (no broadcast to undo).
        direct = [grads is not None and math.prod(x.shape) == math.prod(f) and grads[n].flags.c_contiguous
                  and usable(grads[n]) for n, (x, f) in enumerate(zip(inputs, full))]
        work = [grads[n].reshape(f) if direct[n] else cupy.empty(f, dtype=pr.dtype) for n, f in enumerate(full)]
        dmask = cupy.zeros(pr.batch_shape + (pr.hq, pr.L, pr.S), dtype=np.float32) if mask_grad else None
        if any(w.size for w in work):
            _run_backward(pr, out, lse, dout, *work, deterministic, dmask)
        result = []
        for n, (x, w) in enumerate(zip(inputs, work)):
            if direct[n]:
                result.append(grads[n])
                continue
            if pr.varlen is None:  # sum over batch dims that the inputs broadcast
                w = sum_to_shape(w, x.shape if x.ndim >= 3 else (1,) + x.shape).reshape(x.shape)
            if grads is not None:
                cupy.copyto(grads[n], w)
                w = grads[n]
            result.append(w)
        if mask_grad:
            mask = pr.mask.reshape((1,) * (dmask.ndim - pr.mask.ndim) + tuple(pr.mask.shape))
            summed = sum_to_shape(dmask, mask.shape).reshape(pr.mask.shape).astype(pr.mask.dtype)
            if grads is not None:
                cupy.copyto(grads[3], summed)
                summed = grads[3]
            result.append(summed)
        return tuple(result)


def backward_reasons(pr, mask_grad: bool) -> list[str]:
    """What FLASH's backward lacks for ``pr`` beyond its Capabilities: a float attn_mask's gradient (where
    ``mask_grad``) comes from the Hopper backward for head dims up to 128 on dense batches, with
    ``FlashConfig.bwd90_mask_grad``."""
    if not (mask_grad and pr.mask_kind == "float"):
        return []
    if not config(pr).bwd90_mask_grad:
        return ["no gradient for a float attn_mask (FlashConfig.bwd90_mask_grad is off: EFFICIENT gives it)"]
    if pr.varlen is not None or sm90_backward_is_wide(pr.E, pr.Ev):
        return ["a float attn_mask's gradient only for dense batches and head dims up to 128"]
    return []


def _run_backward(pr, out, lse, dout, dq, dk, dv, deterministic, dmask=None):
    import cupy

    lay = layout(pr)
    accum_elements = dq_accum_elements(pr, deterministic)
    accum = cupy.empty(accum_elements, dtype=np.float32) if accum_elements else None
    out_c, dout_c = _readable(out), _readable(dout)
    views, strides = {}, {}
    for name, x, heads, rows, dim in (("o", out_c, pr.hq, pr.L, pr.Ev), ("do", dout_c, pr.hq, pr.L, pr.Ev),
                                      ("dq", dq, pr.hq, pr.L, pr.E), ("dk", dk, pr.hkv, pr.S, pr.E),
                                      ("dv", dv, pr.hkv, pr.S, pr.Ev)):
        views[name], strides[name] = _out_view(pr, lay, x, heads, rows, dim)
    if accum is not None:
        views["dq_accum"] = accum
    lse_c = cupy.ascontiguousarray(lse)
    mask = mask_operand(pr) if pr.mask is not None else None
    extra, first = mask_values(pr, mask[0], mask_summary(pr, mask[1]), config(pr).fwd90_mask_blocks) \
        if mask else ({}, [])
    if dmask is not None:
        extra["dmask"] = dmask
    slots = values(q=lay.q, k=lay.k, v=lay.v, lse=lse_c, delta=cupy.empty_like(lse_c), **views,
                   **seed_values(pr.seed, pr.offset), **extra)
    bwd = backward_launches(pr, lay, strides, deterministic, mask and mask[1], dmask is not None)
    run(first + bwd if bwd else [], slots,
        cupy.cuda.get_current_stream().ptr, device(pr))


def environment_reasons(pr) -> list[str]:
    """What this machine or these arrays lack for FLASH (beyond its Capabilities)."""
    from ... import environment

    problem = environment.cupy_problem()
    if problem:
        return [problem]
    reasons = []
    if pr is not None and min(pr.E, pr.Ev) < 8:
        reasons.append(f"head dims E={pr.E}, Ev={pr.Ev} must be >= 8")
    if pr is not None and pr.xp.__name__ == "cupy":
        cc = sources.compute_capability(device(pr))
        if cc < 80:
            reasons.append(f"needs compute capability >= 8.0 (bf16/fp16 mma.sync), cuda:{device(pr)} has {cc / 10}")
        if pr.mask is not None or pr.alibi_slopes is not None or pr.softcap:
            cfg = config(pr)
            if not (sm90_forward_applies(pr.E, pr.Ev, cc, cfg) and sm90_backward_applies(pr.E, pr.Ev, cc, cfg)):
                reasons.append("attn_mask, ALiBi and soft-capping run on the Hopper kernels only (compute "
                               "capability 9.0, E and Ev multiples of 32 up to 128, or from 64 to 256)")
            if mask_kind(pr) not in sources.MASK_CODES:
                reasons.append(f"a {mask_kind(pr)} attn_mask is not read (bool, float16, bfloat16 or float32)")
        batch = pr.varlen.batch if pr.varlen is not None else math.prod(pr.batch_shape)
        if batch * max(pr.hq, 1) > MAX_GRID_Y:
            reasons.append(f"batch x heads = {batch * pr.hq} > {MAX_GRID_Y} (grid limit)")
    return reasons

