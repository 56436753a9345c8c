"""The portable forward: pure Numba, fp32 arithmetic, every dtype and feature; also the simulator's.

Layout every kernel sees (built by kernels_numba.layout): rows-of-vectors operands are 6-D views
(B0, B1, B2, H, rows, dim) and per-row scalars (lse, delta) 5-D views (B0, B1, B2, H, rows), with
zero strides where an operand is broadcast, so a broadcast mask or batch is read, never expanded.
Varlen problems come as B0 = B1 = B2 = 1 views over the packed tokens, rows offset by cu_seqlens.
The device functions of ``_common`` (sequence bounds, batch decoding, masks, staging) serve the
backward too (kernels_numba.gradients).

Forward (one thread per query row, FlashAttention's online softmax): stream tiles of K and V
through shared memory; per tile the row's running max m_i and normaliser l_i are updated and acc
is rescaled by exp(m_old - m_new), so the L x S scores never exist. lse = m_i + log(l_i).

Only pairs (i, j) that are visible are touched: a masked key contributes nothing, not 0 * value,
so NaN or inf stored where no query may look (padding) never reaches a result.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from numba import cuda

from . import device
from .device import NEG_INF

MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2


@dataclass(frozen=True)
class Spec:
    """Compile-time constants of one kernel specialisation (the factories are cached on it)."""

    block_rows: int  # threads per block: one row each
    tile: int  # rows of the shared-memory tile
    head_dim: int  # E rounded up to a multiple of 8 (array sizes)
    head_dim_v: int
    bf16: bool  # q/k/v/out are uint16 bf16 bits
    mask: int  # MASK_NONE / MASK_BOOL / MASK_FLOAT
    mask_bf16: bool  # float mask stored as bf16 bits
    dropout: bool
    varlen: bool


def _common(spec: Spec):
    load = device.loader(spec.bf16)
    load_mask = device.loader(spec.mask_bf16)
    visible, key_range, query_range = device.visible, device.key_range, device.query_range
    VARLEN, MASK = spec.varlen, spec.mask

    @cuda.jit(device=True)
    def sequence(cu_q, cu_k, seq, L, S):
        """(first query row, L, first key row, S) of sequence ``seq`` (dense: the whole problem)."""
        if VARLEN:
            q0 = cu_q[seq]
            k0 = cu_k[seq]
            return q0, cu_q[seq + 1] - q0, k0, cu_k[seq + 1] - k0
        return 0, L, 0, S

    @cuda.jit(device=True)
    def batch_index(flat, nb1, nb2):
        """Flat batch index -> (b0, b1, b2) of the merged batch dims (varlen views have all three 1)."""
        if VARLEN:
            return 0, 0, 0
        return flat // (nb1 * nb2), (flat // nb2) % nb1, flat % nb2

    @cuda.jit(device=True)
    def score(mask, b0, b1, b2, h, i, j, s):
        """Apply the attention mask to a visible pair: -inf means masked (selected out). A -inf float-mask
        entry selects the score out as a False bool entry does, so NaN in q k^T there is never added in."""
        if MASK == MASK_BOOL:
            if not mask[b0, b1, b2, h, i, j]:
                return NEG_INF
        elif MASK == MASK_FLOAT:
            m = load_mask(mask[b0, b1, b2, h, i, j])
            if m == NEG_INF:
                return NEG_INF
            s += m
        return s

    @cuda.jit(device=True)
    def unmasked(mask, b0, b1, b2, h, i, j):
        """Bool masks decide before any arithmetic, so a masked pair never touches its data."""
        if MASK == MASK_BOOL:
            return mask[b0, b1, b2, h, i, j]
        return True

    @cuda.jit(device=True)
    def stage(tile, x, b0, b1, b2, h, row0, first, limit, width, tid, nthreads):
        """Copy rows first.. of x[b0, b1, b2, h] (packed rows from row0) into an fp32 shared tile, all
        threads of the block together; rows past ``limit`` and columns past ``width`` become 0."""
        rows, cols = tile.shape
        for t in range(tid, rows * cols, nthreads):
            r, e = t // cols, t % cols
            ok = first + r < limit and e < width
            tile[r, e] = load(x[b0, b1, b2, h, row0 + first + r, e]) if ok else np.float32(0.0)

    @cuda.jit(device=True)
    def contributor(own, rep, own1, own2, nb1, nb2):
        """(b0, b1, b2, flat) of the rep-th problem batch element reading own batch element ``own``."""
        o0, o1, o2 = batch_index(own, own1, own2)
        b0, b1, b2 = batch_of(o0, o1, o2, rep, nb1, nb2, own1, own2)
        return b0, b1, b2, own if VARLEN else (b0 * nb1 + b1) * nb2 + b2

    return load, visible, key_range, query_range, sequence, batch_index, score, unmasked, stage, contributor


@functools.cache
def forward_kernel(spec: Spec):
    load, visible, key_range, _, sequence, batch_index, score, unmasked, stage, contributor = _common(spec)
    store = device.storer(spec.bf16)
    BLOCK_M, BLOCK_N, HEAD_DIM, HEAD_DIM_V = spec.block_rows, spec.tile, spec.head_dim, spec.head_dim_v
    DROPOUT = spec.dropout

    @cuda.jit
    def attention_forward(q, k, v, mask, out, lse, cu_q, cu_k, nb1, nb2, hq, group, L, S, E, Ev, scale,
                          causal, lower_right, left, right, seed_lo, seed_hi, offset, threshold, rescale):
        tid = cuda.threadIdx.x
        bh = cuda.blockIdx.x
        h = bh % hq
        hk = h // group
        b0, b1, b2 = batch_index(bh // hq, nb1, nb2)
        q0, L_b, k0, S_b = sequence(cu_q, cu_k, bh // hq, L, S)
        # the last query blocks first: under a causal band they see the most keys, and blocks start in grid
        # order, so the heavy ones start first rather than forming the tail (FlashAttention-2's order)
        m_first = (cuda.gridDim.y - 1 - cuda.blockIdx.y) * BLOCK_M
        if m_first >= L_b:
            return  # whole block: varlen grids are sized for the longest sequence
        shift = S_b - L_b if lower_right else 0
        scale32 = np.float32(scale)
        drop_scale = np.float32(rescale)

        k_tile = cuda.shared.array((BLOCK_N, HEAD_DIM), np.float32)
        v_tile = cuda.shared.array((BLOCK_N, HEAD_DIM_V), np.float32)
        q_i = cuda.local.array(HEAD_DIM, np.float32)
        acc = cuda.local.array(HEAD_DIM_V, np.float32)
        s_i = cuda.local.array(BLOCK_N, np.float32)

        i = m_first + tid
        row_ok = i < L_b
        for e in range(E):
            q_i[e] = load(q[b0, b1, b2, h, q0 + i, e]) if row_ok else np.float32(0.0)
        for d in range(Ev):
            acc[d] = np.float32(0.0)
        m_i = np.float32(NEG_INF)
        l_i = np.float32(0.0)

        lo, hi = key_range(m_first, min(L_b, m_first + BLOCK_M) - 1, causal, shift, S_b, left, right)
        for n0 in range(lo // BLOCK_N * BLOCK_N, hi, BLOCK_N):
            cuda.syncthreads()  # the previous tile is no longer read
            stage(k_tile, k, b0, b1, b2, hk, k0, n0, S_b, E, tid, BLOCK_M)
            stage(v_tile, v, b0, b1, b2, hk, k0, n0, S_b, Ev, tid, BLOCK_M)
            cuda.syncthreads()
            if row_ok:
                m_new = m_i
                for jj in range(BLOCK_N):
                    j = n0 + jj
                    s = np.float32(NEG_INF)
                    if j < S_b and visible(i, j, causal, shift, left, right) and \
                            unmasked(mask, b0, b1, b2, h, i, j):
                        dot = np.float32(0.0)
                        for e in range(E):
                            dot += q_i[e] * k_tile[jj, e]
                        s = np.float32(score(mask, b0, b1, b2, h, i, j, dot * scale32))
                    s_i[jj] = s
                    if s != NEG_INF and not s <= m_new:  # NaN enters m_new and so poisons the row, as it should
                        m_new = s
                if m_new != NEG_INF:
                    alpha = np.float32(math.exp(m_i - m_new))  # exp(-inf) = 0 on the first visible tile
                    l_i *= alpha
                    for d in range(Ev):
                        acc[d] *= alpha
                    m_i = m_new
                    words = (np.uint64(0), np.uint64(0), np.uint64(0), np.uint64(0))
                    for jj in range(BLOCK_N):
                        j = n0 + jj
                        if DROPOUT and jj % 4 == 0:
                            words = device.philox_group(j, i, bh, offset, seed_lo, seed_hi)
                        s = s_i[jj]
                        if s != NEG_INF:
                            p = np.float32(math.exp(s - m_i))
                            l_i += p
                            if DROPOUT:
                                keep = device.pick_word(words, j) < np.uint64(threshold)
                                p = p * drop_scale if keep else np.float32(0.0)
                            for d in range(Ev):
                                acc[d] += p * v_tile[jj, d]
        if row_ok:
            if m_i == NEG_INF:  # no visible key: output 0, lse -inf
                for d in range(Ev):
                    out[b0, b1, b2, h, q0 + i, d] = store(np.float32(0.0))
                lse[b0, b1, b2, h, q0 + i] = NEG_INF
            else:
                inv = np.float32(1.0) / l_i
                for d in range(Ev):
                    out[b0, b1, b2, h, q0 + i, d] = store(acc[d] * inv)
                lse[b0, b1, b2, h, q0 + i] = m_i + np.float32(math.log(l_i))

    return attention_forward


@cuda.jit(device=True)
def batch_of(o0, o1, o2, rep, nb1, nb2, own1, own2):
    """The rep-th problem batch element that reads own batch element (o0, o1, o2) of a broadcast operand.

    Along a merged batch dim the operand either has the full size (the index is its own) or size 1
    (every index of the dim reads it): ``rep`` enumerates the latter dims in C order.
    """
    r = rep
    b2 = o2
    if own2 == 1 and nb2 > 1:
        b2 = r % nb2
        r //= nb2
    b1 = o1
    if own1 == 1 and nb1 > 1:
        b1 = r % nb1
        r //= nb1
    b0 = o0 + r  # own0 == 1 < nb0 leaves r in [0, nb0); else r == 0
    return b0, b1, b2
