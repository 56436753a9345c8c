"""The portable forward: blocked like the backward (kernels_numba.gradients), pure Numba, fp32 arithmetic,
every dtype and feature; also the simulator's.

One block of THREADS x THREADS threads per BLOCK_M query rows walks the key tiles with FlashAttention's
online softmax. Per tile the score tile S = K Q^T comes from the backward's ``score_tile`` (each thread
SUB_N keys by SUB_M queries, queries strided by THREADS); each query's running max is reduced over the
THREADS threads that share it through shared memory; P = exp(S - max) goes to shared memory as
[key, query], and O += P V is the backward's gradient product (each thread SUB_M rows of O by
head dim / THREADS columns, V streamed through shared memory), after O's rows are rescaled by
exp(old max - new max). Row sums are kept per thread and added in a fixed order at the end:
lse = max + log(sum), out = O / sum. The row-per-thread kernel this replaces held q and the output row in
local memory and read each staged key with one FMA per load: 1 TF/s on fp32 (H200) where PyTorch's
EFFICIENT_ATTENTION reaches 34.

Only visible pairs carry weight: scores that are not allowed are -inf before any arithmetic (a bool mask
decides before the product's value is read), so NaN in q k^T there never enters the max or a sum. V rows
that no query of the block sees (no visible score) are staged as zeros, so NaN or inf where no query
may look (padding keys) never meets a 0 weight; a NaN or +inf score makes its row NaN, as in the
reference (cusdpa/reference.py).
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda

from . import device
from .device import NEG_INF
from .gradients import Spec, _max_registers, _tile_ops, stage_floats
from .portable import _common


@functools.cache
def forward_kernel(spec: Spec):
    visible, key_range, _, sequence, batch_index, score, unmasked, _ = _common(spec)
    score_tile, _, gradient_product, dropout_scale = _tile_ops(spec)
    store = device.storer(spec.bf16)
    G, SUB_N, SUB_M, BLOCK_N, BLOCK_M = spec.threads, spec.sub_n, spec.sub_m, spec.block_n, spec.block_m
    HEAD_DIM_V = spec.head_dim_v
    COLS = HEAD_DIM_V // G
    STAGE = stage_floats(spec)
    DROPOUT = spec.dropout
    P_SHAPE = (BLOCK_N, BLOCK_M + 1)  # padded rows: a warp's column reads hit distinct banks
    pv_product = gradient_product(SUB_M, HEAD_DIM_V, BLOCK_N)

    @device.kernel(_max_registers(spec))
    def attention_forward(q, k, v, mask, out, lse, cu_q, cu_k, nb1, nb2, hq, group, L, S, E, Ev, scale,
                          causal, lower_right, left, right, seed_lo, seed_hi, offset, threshold, rescale):
        tid = cuda.threadIdx.x
        tr = tid // G
        tc = tid % G
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
        buf = cuda.shared.array(STAGE, np.float32)
        p_tile = cuda.shared.array(P_SHAPE, np.float32)  # P (times Z) as [key, query]; rows 0..G-1 also reduce
        row_alpha = cuda.shared.array(BLOCK_M, np.float32)  # this tile's rescale of each query's row of O
        row_max = cuda.shared.array(BLOCK_M, np.float32)
        key_dead = cuda.shared.array(BLOCK_N, np.float32)  # -inf: no query of the block sees the key
        s_acc = cuda.local.array((SUB_N, SUB_M), np.float32)  # S, then P, of keys tr * SUB_N + a, queries tc + G * b
        weighs = cuda.local.array(SUB_N, np.int32)  # whether some query of this thread sees key tr * SUB_N + a
        m_run = cuda.local.array(SUB_M, np.float32)  # running max of queries tc + G * b
        l_part = cuda.local.array(SUB_M, np.float32)  # this thread's share of their row sums
        o_acc = cuda.local.array((SUB_M, COLS), np.float32)  # rows m_first + tr * SUB_M + a, cols tc + G * c
        for b in range(SUB_M):
            m_run[b] = np.float32(NEG_INF)
            l_part[b] = np.float32(0.0)
            for c in range(COLS):
                o_acc[b, c] = np.float32(0.0)
        qx, kx, vx = q[b0, b1, b2, h], k[b0, b1, b2, hk], v[b0, b1, b2, hk]
        lo, hi = key_range(m_first, min(L_b, m_first + BLOCK_M) - 1, causal, shift, S_b, left, right)
        for n0 in range(lo // BLOCK_N * BLOCK_N, hi, BLOCK_N):
            score_tile(s_acc, kx, k0 + n0, k0 + S_b, qx, q0 + m_first, q0 + L_b, E, buf, tid, tr, tc)
            # (score_tile's first barrier: the previous tile's product no longer reads p_tile or key_dead)
            for b in range(SUB_M):
                i = m_first + tc + G * b
                top = np.float32(NEG_INF)
                for a in range(SUB_N):
                    j = n0 + tr * SUB_N + a
                    s = np.float32(NEG_INF)
                    if i < L_b and j < S_b and visible(i, j, causal, shift, left, right) and \
                            unmasked(mask, b0, b1, b2, h, i, j):
                        s = np.float32(score(mask, b0, b1, b2, h, i, j, s_acc[a, b] * scale32))
                    s_acc[a, b] = s
                    if s != NEG_INF and not s <= top:  # NaN enters the max, and its p poisons the row
                        top = s
                p_tile[tr, tc + G * b] = top
            for a in range(SUB_N):
                weighs[a] = 0
                if tc == 0:
                    key_dead[tr * SUB_N + a] = np.float32(NEG_INF)
            cuda.syncthreads()
            for b in range(SUB_M):
                i = m_first + tc + G * b
                top = m_run[b]
                for t in range(G):  # the tile's max over the G threads sharing the query, in a fixed order
                    x = p_tile[t, tc + G * b]
                    if x != NEG_INF and not x <= top:
                        top = x
                alpha = np.float32(1.0)
                if top != NEG_INF:
                    alpha = np.float32(math.exp(m_run[b] - top))  # 0 on the query's first visible tile
                m_run[b] = top
                l_part[b] *= alpha
                if tr == 0:
                    row_alpha[tc + G * b] = alpha
                words = (np.uint64(0), np.uint64(0), np.uint64(0), np.uint64(0))
                for a in range(SUB_N):
                    j = n0 + tr * SUB_N + a
                    z = np.float32(1.0)
                    if DROPOUT:
                        words, z = dropout_scale(words, a, j, i, bh, offset, seed_lo, seed_hi, threshold, drop_scale)
                    s = s_acc[a, b]
                    p = np.float32(0.0)
                    if s != NEG_INF:  # visible (NaN too): its V row is staged as it is, even where p underflows
                        p = np.float32(math.exp(s - top))
                        l_part[b] += p
                        weighs[a] = 1
                    s_acc[a, b] = p * z
            for a in range(SUB_N):  # an atomic, not a plain store of the same value by several threads
                if weighs[a]:
                    cuda.atomic.max(key_dead, tr * SUB_N + a, np.float32(0.0))
            cuda.syncthreads()  # the partial maxima are read before P overwrites them
            for b in range(SUB_M):
                for a in range(SUB_N):
                    p_tile[tr * SUB_N + a, tc + G * b] = s_acc[a, b]
            for a in range(SUB_M):
                alpha = row_alpha[tr * SUB_M + a]
                for c in range(COLS):
                    o_acc[a, c] *= alpha
            pv_product(o_acc, p_tile, vx, k0 + n0, k0 + S_b, Ev, key_dead, True, False, buf, tid, tr, tc)
        # the row sums: the G threads sharing a query add their shares in a fixed order
        cuda.syncthreads()  # the last product no longer reads p_tile
        for b in range(SUB_M):
            p_tile[tr, tc + G * b] = l_part[b]
            if tr == 0:
                row_max[tc + G * b] = m_run[b]
        cuda.syncthreads()
        for a in range(SUB_M):
            r = tr * SUB_M + a
            i = m_first + r
            if i < L_b:
                total = np.float32(0.0)
                for t in range(G):
                    total += p_tile[t, r]
                top = row_max[r]
                if top == NEG_INF:  # no visible key: output 0, lse -inf
                    for c in range(COLS):
                        e = tc + G * c
                        if e < Ev:
                            out[b0, b1, b2, h, q0 + i, e] = store(np.float32(0.0))
                    if tc == 0:
                        lse[b0, b1, b2, h, q0 + i] = NEG_INF
                else:
                    inv = np.float32(1.0) / total
                    for c in range(COLS):
                        e = tc + G * c
                        if e < Ev:
                            out[b0, b1, b2, h, q0 + i, e] = store(o_acc[a, c] * inv)
                    if tc == 0:
                        lse[b0, b1, b2, h, q0 + i] = top + np.float32(math.log(total))

    return attention_forward
