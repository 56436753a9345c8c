"""The portable kernels: pure Numba, fp32 arithmetic, every dtype and feature; also the simulator's.

Layout every kernel sees (built by kernels_numba.layout): rows-of-vectors operands are 6-D views
(B0, B1, B2, H, rows, dim) and per-row scalars (lse, delta) 5-D views (B0, B1, B2, H, rows), with
zero strides where an operand is broadcast, so a broadcast mask or batch is read, never expanded.
Varlen problems come as B0 = B1 = B2 = 1 views over the packed tokens, rows offset by cu_seqlens.

Forward (one thread per query row, FlashAttention's online softmax): stream tiles of K and V
through shared memory; per tile the row's running max m_i and normaliser l_i are updated and acc
is rescaled by exp(m_old - m_new), so the L x S scores never exist. lse = m_i + log(l_i).
Backward (FlashAttention-2's split): dq with one thread per query row streaming K/V tiles, twice:
first for delta_i = rowsum(P * dP), then for dS = P * (dP - delta_i). FlashAttention takes delta
from rowsum(dout * out) instead, one pass cheaper, but out is rounded to the input dtype and that
rounding (2**-9 relative in bf16) lands in every gradient; summed in fp32 from P and dP, the
gradients stay as accurate as an fp32 reference. dk/dv with one thread per key
row streaming Q/dout tiles, summing the query heads of its GQA group and any batch it is broadcast
over; a float mask's gradient dS is written by the dq kernel where each mask element belongs to one
score, else reduced by its own kernel in a fixed order. No atomics anywhere: the gradients are the
same bit for bit run to run.

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
        """Apply the attention mask to a visible pair: -inf means masked (selected out)."""
        if MASK == MASK_BOOL:
            if not mask[b0, b1, b2, h, i, j]:
                return NEG_INF
        elif MASK == MASK_FLOAT:
            s += load_mask(mask[b0, b1, b2, h, i, j])
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
        m_first = cuda.blockIdx.y * BLOCK_M
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


@functools.cache
def dq_kernel(spec: Spec, dmask_direct: bool):
    load, visible, key_range, _, sequence, batch_index, score, unmasked, stage, contributor = _common(spec)
    store = device.storer(spec.bf16)
    store_mask = device.storer(spec.mask_bf16)
    BLOCK_M, BLOCK_N, HEAD_DIM, HEAD_DIM_V = spec.block_rows, spec.tile, spec.head_dim, spec.head_dim_v
    DROPOUT, DMASK_DIRECT = spec.dropout, dmask_direct

    @cuda.jit
    def attention_dq(q, k, v, mask, dout, lse, delta, dq, dmask, cu_q, cu_k, nb1, nb2, own1, own2, reps,
                     hq, group, L, S, E, Ev, scale, causal, lower_right, left, right, seed_lo, seed_hi, offset,
                     threshold, rescale):
        """dq_i = scale * sum_j dS_ij k_j with dS = P * (dP - delta); q's own batch element sums every
        problem batch it was broadcast to (``reps`` of them, decoded by batch_of). Writes delta."""
        tid = cuda.threadIdx.x
        h = cuda.blockIdx.x % hq
        hk = h // group
        own = cuda.blockIdx.x // hq
        m_first = cuda.blockIdx.y * BLOCK_M
        scale32 = np.float32(scale)
        drop_scale = np.float32(rescale)
        k_tile = cuda.shared.array((BLOCK_N, HEAD_DIM), np.float32)
        v_tile = cuda.shared.array((BLOCK_N, HEAD_DIM_V), np.float32)
        q_i = cuda.local.array(HEAD_DIM, np.float32)
        do_i = cuda.local.array(HEAD_DIM_V, np.float32)
        dq_i = cuda.local.array(HEAD_DIM, np.float32)
        for e in range(E):
            dq_i[e] = np.float32(0.0)
        o0, o1, o2 = batch_index(own, own1, own2)
        q0 = 0
        L_b = L
        for rep in range(reps):
            b0, b1, b2, flat = contributor(own, rep, own1, own2, nb1, nb2)
            q0, L_b, k0, S_b = sequence(cu_q, cu_k, flat, L, S)
            if m_first >= L_b:
                break  # uniform over the block; only varlen (reps == 1) gets here
            bh = flat * hq + h
            shift = S_b - L_b if lower_right else 0
            i = m_first + tid
            active = i < L_b
            lse_i = np.float32(NEG_INF)
            if active:
                lse_i = lse[b0, b1, b2, h, q0 + i]
                active = lse_i != NEG_INF  # a row that sees nothing has zero gradients
            if active:
                for e in range(E):
                    q_i[e] = load(q[b0, b1, b2, h, q0 + i, e])
                for d in range(Ev):
                    do_i[d] = load(dout[b0, b1, b2, h, q0 + i, d])
            lo, hi = key_range(m_first, min(L_b, m_first + BLOCK_M) - 1, causal, shift, S_b, left, right)
            # Pass 0 sums delta_i = rowsum(P * dP); pass 1 uses it in dS = P * (dP - delta_i).
            delta_i = np.float32(0.0)
            for phase in range(2):
                for n0 in range(lo // BLOCK_N * BLOCK_N, hi, BLOCK_N):
                    cuda.syncthreads()
                    stage(k_tile, k, b0, b1, b2, hk, k0, n0, S_b, E, tid, BLOCK_M)
                    stage(v_tile, v, b0, b1, b2, hk, k0, n0, S_b, Ev, tid, BLOCK_M)
                    cuda.syncthreads()
                    if active:
                        for jj in range(BLOCK_N):
                            j = n0 + jj
                            if j < S_b and visible(i, j, causal, shift, left, right) and \
                                    unmasked(mask, b0, b1, b2, h, i, j):
                                dot = np.float32(0.0)
                                for e in range(E):
                                    dot += q_i[e] * k_tile[jj, e]
                                s = np.float32(score(mask, b0, b1, b2, h, i, j, dot * scale32))
                                if s != NEG_INF:
                                    p = np.float32(math.exp(s - lse_i))
                                    dp = np.float32(0.0)
                                    for d in range(Ev):
                                        dp += do_i[d] * v_tile[jj, d]
                                    if DROPOUT:
                                        dp *= device.keep_scale(j, i, bh, offset, seed_lo, seed_hi, threshold,
                                                                drop_scale)
                                    if phase == 0:
                                        delta_i += p * dp
                                    else:
                                        ds = p * (dp - delta_i)
                                        for e in range(E):
                                            dq_i[e] += ds * k_tile[jj, e]
                                        if DMASK_DIRECT:
                                            dmask[b0, b1, b2, h, i, j] = store_mask(ds)
            if i < L_b:
                delta[b0, b1, b2, h, q0 + i] = delta_i  # for the dk/dv and dmask kernels, launched after
        if m_first + tid < L_b:
            for e in range(E):
                dq[o0, o1, o2, h, q0 + m_first + tid, e] = store(dq_i[e] * scale32)

    return attention_dq


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


@functools.cache
def dkdv_kernel(spec: Spec):
    load, visible, _, query_range, sequence, batch_index, score, unmasked, stage, contributor = _common(spec)
    store = device.storer(spec.bf16)
    BLOCK_N, BLOCK_M, HEAD_DIM, HEAD_DIM_V = spec.block_rows, spec.tile, spec.head_dim, spec.head_dim_v
    DROPOUT = spec.dropout

    @cuda.jit
    def attention_dkdv(q, k, v, mask, dout, lse, delta, dk, dv, cu_q, cu_k, nb1, nb2, own1, own2, reps,
                       want_dk, want_dv, hq, hkv, group, L, S, E, Ev, scale, causal, lower_right, left, right, seed_lo,
                       seed_hi,
                       offset, threshold, rescale):
        """dv_j = sum_i A_ij dout_i and dk_j = scale * sum_i dS_ij q_i for one key row per thread, over the
        query heads of its GQA group and every problem batch its own batch element was broadcast to."""
        tid = cuda.threadIdx.x
        hk = cuda.blockIdx.x % hkv
        own = cuda.blockIdx.x // hkv
        n_first = cuda.blockIdx.y * BLOCK_N
        scale32 = np.float32(scale)
        drop_scale = np.float32(rescale)
        q_tile = cuda.shared.array((BLOCK_M, HEAD_DIM), np.float32)
        do_tile = cuda.shared.array((BLOCK_M, HEAD_DIM_V), np.float32)
        lse_tile = cuda.shared.array(BLOCK_M, np.float32)
        delta_tile = cuda.shared.array(BLOCK_M, np.float32)
        k_j = cuda.local.array(HEAD_DIM, np.float32)
        v_j = cuda.local.array(HEAD_DIM_V, np.float32)
        dk_j = cuda.local.array(HEAD_DIM, np.float32)
        dv_j = cuda.local.array(HEAD_DIM_V, np.float32)
        for e in range(E):
            dk_j[e] = np.float32(0.0)
        for d in range(Ev):
            dv_j[d] = np.float32(0.0)
        o0, o1, o2 = batch_index(own, own1, own2)
        k0 = 0
        S_b = S
        for rep in range(reps):
            b0, b1, b2, flat = contributor(own, rep, own1, own2, nb1, nb2)
            q0, L_b, k0, S_b = sequence(cu_q, cu_k, flat, L, S)
            if n_first >= S_b:
                break  # uniform over the block; only varlen (reps == 1) gets here
            shift = S_b - L_b if lower_right else 0
            j = n_first + tid
            col_ok = j < S_b
            if col_ok:
                for e in range(E):
                    k_j[e] = load(k[b0, b1, b2, hk, k0 + j, e])
                for d in range(Ev):
                    v_j[d] = load(v[b0, b1, b2, hk, k0 + j, d])
            lo, hi = query_range(n_first, min(S_b, n_first + BLOCK_N) - 1, causal, shift, L_b, left, right)
            for h in range(hk * group, hk * group + group):
                bh = flat * hq + h
                for m0 in range(lo // BLOCK_M * BLOCK_M, hi, BLOCK_M):
                    cuda.syncthreads()
                    stage(q_tile, q, b0, b1, b2, h, q0, m0, L_b, E, tid, BLOCK_N)
                    stage(do_tile, dout, b0, b1, b2, h, q0, m0, L_b, Ev, tid, BLOCK_N)
                    for r in range(tid, BLOCK_M, BLOCK_N):
                        ok = m0 + r < L_b
                        lse_tile[r] = lse[b0, b1, b2, h, q0 + m0 + r] if ok else np.float32(NEG_INF)
                        delta_tile[r] = delta[b0, b1, b2, h, q0 + m0 + r] if ok else np.float32(0.0)
                    cuda.syncthreads()
                    if col_ok:
                        for ii in range(BLOCK_M):
                            i = m0 + ii
                            lse_i = lse_tile[ii]
                            if lse_i != NEG_INF and visible(i, j, causal, shift, left, right) and \
                                    unmasked(mask, b0, b1, b2, h, i, j):
                                dot = np.float32(0.0)
                                for e in range(E):
                                    dot += q_tile[ii, e] * k_j[e]
                                s = np.float32(score(mask, b0, b1, b2, h, i, j, dot * scale32))
                                if s != NEG_INF:
                                    p = np.float32(math.exp(s - lse_i))
                                    z = np.float32(1.0)
                                    if DROPOUT:
                                        z = device.keep_scale(j, i, bh, offset, seed_lo, seed_hi, threshold,
                                                              drop_scale)
                                    pz = p * z
                                    dp = np.float32(0.0)
                                    for d in range(Ev):
                                        dv_j[d] += pz * do_tile[ii, d]
                                        dp += do_tile[ii, d] * v_j[d]
                                    ds = p * (dp * z - delta_tile[ii])
                                    for e in range(E):
                                        dk_j[e] += ds * q_tile[ii, e]
        j = n_first + tid
        if j < S_b:
            if want_dk:
                for e in range(E):
                    dk[o0, o1, o2, hk, k0 + j, e] = store(dk_j[e] * scale32)
            if want_dv:
                for d in range(Ev):
                    dv[o0, o1, o2, hk, k0 + j, d] = store(dv_j[d])

    return attention_dkdv


@functools.cache
def dmask_kernel(spec: Spec):
    load, visible = _common(spec)[:2]
    load_mask = device.loader(spec.mask_bf16)
    store_mask = device.storer(spec.mask_bf16)
    DROPOUT, BLOCK = spec.dropout, spec.block_rows

    @cuda.jit
    def attention_dmask(q, k, v, mask, dout, lse, delta, dmask, dshape, full, group, E, Ev, scale, causal,
                        lower_right, left, right,
                        seed_lo, seed_hi, offset, threshold, rescale):
        """One thread per element of a broadcast float mask's gradient: the sum of dS over every score
        the element was added to, recomputed pair by pair in a fixed order (no atomics)."""
        t = cuda.blockIdx.x * BLOCK + cuda.threadIdx.x
        n = 1
        for a in range(6):
            n *= dshape[a]
        if t >= n:
            return
        own = cuda.local.array(6, np.int64)
        r = t
        for a in range(5, -1, -1):
            own[a] = r % dshape[a]
            r //= dshape[a]
        reps = 1
        for a in range(6):
            if dshape[a] != full[a]:
                reps *= full[a]
        L = full[4]
        S = full[5]
        shift = S - L if lower_right else 0
        scale32 = np.float32(scale)
        drop_scale = np.float32(rescale)
        idx = cuda.local.array(6, np.int64)
        total = np.float32(0.0)
        for rep in range(reps):
            r = rep
            for a in range(5, -1, -1):
                if dshape[a] != full[a]:
                    idx[a] = r % full[a]
                    r //= full[a]
                else:
                    idx[a] = own[a]
            b0, b1, b2, h, i, j = idx[0], idx[1], idx[2], idx[3], idx[4], idx[5]
            lse_i = lse[b0, b1, b2, h, i]
            if lse_i == NEG_INF or not visible(i, j, causal, shift, left, right):
                continue
            hk = h // group
            dot = np.float32(0.0)
            for e in range(E):
                dot += load(q[b0, b1, b2, h, i, e]) * load(k[b0, b1, b2, hk, j, e])
            s = dot * scale32 + load_mask(mask[b0, b1, b2, h, i, j])
            if s == NEG_INF:
                continue
            p = np.float32(math.exp(s - lse_i))
            dp = np.float32(0.0)
            for d in range(Ev):
                dp += load(dout[b0, b1, b2, h, i, d]) * load(v[b0, b1, b2, hk, j, d])
            if DROPOUT:
                bh = ((b0 * full[1] + b1) * full[2] + b2) * full[3] + h
                dp *= device.keep_scale(j, i, bh, offset, seed_lo, seed_hi, threshold, drop_scale)
            total += p * (dp - delta[b0, b1, b2, h, i])
        dmask[own[0], own[1], own[2], own[3], own[4], own[5]] = store_mask(total)

    return attention_dmask
