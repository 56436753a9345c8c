"""The portable backward: blocked like a GEMM, pure Numba, fp32 arithmetic; also the simulator's.

Two kernels, FlashAttention-2's split, deterministic (no atomics: every run gives the same bits):

- dq (one block per BLOCK_M query rows): forms dS = P * (dP - delta_i) per key tile and accumulates
  dQ += dS K; delta_i (written out for the dk/dv kernel) is FlashAttention's rowsum(dout * out), or,
  where it must be exact, summed as rowsum(P * dP) in a first walk over the key tiles. Exact means a
  broadcast float mask's gradient, a sum of dS over scores where sum_j dS_ij = rowsum(P * dP) - delta_i
  cancels: delta from the output rounded to the input dtype (2**-9 relative in bf16) would leave that
  rounding in it. The first walk costs two of the kernel's five tile products. It also sums P's rows
  and moves lse_i by the log of that sum (written into the backward's copy of lse, which the dk/dv and
  dmask kernels read): the forward's lse may come from other arithmetic (the tensor_core loops), and a
  row of P summing to 1 + eps would scale every dS of the row by it and leave sum_j dS_ij = -delta_i eps.
- dk/dv (one block per BLOCK_N key rows): walks the query tiles of every query head of its GQA
  group and every problem batch its own batch element was broadcast to, accumulating
  dV += (P * Z)^T dO and dK += dS^T Q in registers.

Both run the same two tile products per tile pair. The score tiles S = K Q^T and dP = V dO^T
(BLOCK_N x BLOCK_M) are split over a THREADS x THREADS block, each thread owning SUB_N keys
(contiguous, so one Philox call serves 4 dropout decisions) by SUB_M queries (strided by THREADS,
so the warp's reads of a staged row are conflict-free); the reduction over the head dim streams
CHUNK columns of both operands through shared memory. The gradient products dV, dK (or dQ) take the
probability-side tile from shared memory and stream the row-side operand (dO, Q, or K) through shared
memory in CHUNK-row slices; each thread owns its rows x (head dim / THREADS) accumulators for the
whole kernel. Per staged value a thread does SUB (or head_dim / THREADS) FMAs, and the
accumulators are scalar registers (local arrays indexed only by unrolled constants), so no FMA
touches local memory. Shared tiles are fp32 with rows padded by one word, so a warp reading one
column of a row-major tile hits 16 different banks.

Only visible pairs carry weight: P and dS are selected (not multiplied) to 0 elsewhere, so NaN or
inf in S or dP at a masked pair never reaches a sum. The row-side operands of the gradient products
are staged so that 0 * NaN cannot leak either: Q and dO rows that see no key are zeroed (the
reference's rule), and non-finite key values are zeroed in K for dQ (a key some query sees makes
that query's dS non-finite anyway, so nothing is lost). A float mask's gradient dS is written by
the dq kernel where each mask element belongs to one score, else reduced by its own kernel in a
fixed order.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from numba import cuda

from . import device
from .device import NEG_INF
from .portable import _common


@dataclass(frozen=True)
class Spec:
    """Compile-time constants of one blocked specialisation, forward (kernels_numba.blocked_forward) or backward (the
    factories are cached on it)."""

    threads: int  # THREADS: the block is THREADS x THREADS threads
    sub_n: int  # SUB_N: keys per thread in a score tile (BLOCK_N = THREADS * SUB_N)
    sub_m: int  # SUB_M: queries per thread (BLOCK_M = THREADS * SUB_M)
    chunk: int  # CHUNK: head-dim columns per staged step of the score products
    rows: int  # ROWS: rows per staged step of the gradient products (divides the reduced block)
    head_dim: int  # E rounded up to a multiple of THREADS (accumulator columns)
    head_dim_v: int
    bf16: bool  # q/k/v/dout/grads are uint16 bf16 bits
    mask: int  # portable.MASK_NONE / MASK_BOOL / MASK_FLOAT
    mask_bf16: bool  # float mask stored as bf16 bits
    dropout: bool
    varlen: bool
    # fp32 inputs: the backward's dP and delta = rowsum(dout * out) summed in fp64 from exact products. dS = P (dP -
    # delta) cancels on a row that one key dominates, where fp32 sums of Ev products left dP ~20 units off that
    # delta did not share (dk at 16x PyTorch's error, E = 136); rounded to fp32 after the sums, a row that sees one
    # key still has dP == delta bit for bit (out == v there)
    wide: bool = False

    @property
    def block_m(self) -> int:
        return self.threads * self.sub_m

    @property
    def block_n(self) -> int:
        return self.threads * self.sub_n


def stage_floats(spec: Spec) -> int:
    """fp32 words of the staging buffer: both score-product chunks, or ROWS padded rows of the widest operand."""
    score = (spec.block_n + spec.block_m) * (spec.chunk + 1)
    return max(score, spec.rows * (max(spec.head_dim, spec.head_dim_v) + 1))


def _max_registers(spec: Spec) -> int:
    """Registers per thread that let two blocks share an SM's 64K, so one block's loads and barriers overlap
    the other's FMAs: 128 at the default 16 x 16 threads, up to 255 for smaller blocks (8 x 8 threads with
    8 x 8 register tiles need them); one block per SM where two would leave fewer than 64. ptxas would take
    ~250 at 256 threads otherwise (one block per SM) to hoist address arithmetic. At the default the hot
    loops stay spill-free (checked with ptxas/cuobjdump): the spills land in the once-per-tile code."""
    threads = spec.threads * spec.threads
    two_blocks = 65536 // (2 * threads)
    return min(255, (two_blocks if two_blocks >= 64 else 65536 // threads) // 8 * 8)


def _tile_ops(spec: Spec):
    """The device functions the blocked kernels build on (the backward's two and the forward), specialised to
    ``spec``'s tile sizes.

    Hot loops index with uint64 (np.uint64 casts are free): Numba adds a negative-index wraparound
    select to every signed index, which would cost more integer instructions than the FMAs they
    feed; unsigned, each shared-memory read becomes one load at a constant offset from a pointer
    that the while loop steps.
    """
    load = device.loader(spec.bf16)
    G, SUB_N, SUB_M, CHUNK, ROWS = spec.threads, spec.sub_n, spec.sub_m, spec.chunk, spec.rows
    BLOCK_N, BLOCK_M = spec.block_n, spec.block_m
    NT = G * G
    STRIDE = CHUNK + 1  # padded row of a staged chunk
    B_AT = BLOCK_N * STRIDE  # the query-side chunk follows the key-side one
    U = np.uint64

    @device.inline
    def stage_chunk(buf, at, x, first_row, limit_row, col0, width, n_rows, tid):
        """buf[at + r * STRIDE + c] = x[first_row + r, col0 + c] for n_rows x CHUNK; 0 at rows >= limit_row
        and columns >= width."""
        t = U(tid)
        while t < U(n_rows * CHUNK):
            r = t // U(CHUNK)
            c = t % U(CHUNK)
            val = np.float32(0.0)
            if U(first_row) + r < U(limit_row) and U(col0) + c < U(width):
                val = load(x[U(first_row) + r, U(col0) + c])
            buf[U(at) + r * U(STRIDE) + c] = val
            t += U(NT)

    def score_product(ACC):
        """score_tile summing in ACC: np.float32, or np.float64 (exact products of the fp32 operands)."""

        @device.inline
        def score_tile(acc, kx, first_key, limit_key, qx, first_query, limit_query, width, buf, tid, tr, tc):
            """acc[a, b] = kx[first_key + tr * SUB_N + a] . qx[first_query + tc + G * b] over the first ``width``
            columns in order (rows past the limits read as 0): one SUB_N x SUB_M piece of K Q^T or V dO^T."""
            q_col = cuda.local.array(SUB_M, np.float32)
            for a in range(SUB_N):
                for b in range(SUB_M):
                    acc[a, b] = ACC(0.0)
            k_at = U(tr * SUB_N * STRIDE)
            q_at = U(B_AT + tc * STRIDE)
            for e0 in range(0, width, CHUNK):
                cuda.syncthreads()  # the previous chunk (or gradient product) is no longer read
                stage_chunk(buf, 0, kx, first_key, limit_key, e0, width, BLOCK_N, tid)
                stage_chunk(buf, B_AT, qx, first_query, limit_query, e0, width, BLOCK_M, tid)
                cuda.syncthreads()
                e = U(0)
                while e < U(CHUNK):
                    for b in range(SUB_M):
                        q_col[b] = buf[q_at + U(G * b * STRIDE) + e]
                    for a in range(SUB_N):
                        k_val = buf[k_at + U(a * STRIDE) + e]
                        for b in range(SUB_M):
                            acc[a, b] += ACC(k_val) * ACC(q_col[b])
                    e += U(1)

        return score_tile

    score_tile = score_product(np.float32)

    def gradient_product(T: int, HEAD_DIM: int, REDUCED: int):
        """acc[a, c] += sum_r weights[r, tr * T + a] * x[first_row + r, tc + G * c] over the REDUCED rows of
        the weights tile (P^T, dS^T or dS in shared memory), x streamed ROWS rows at a time. Rows at or
        past ``limit_row``, rows whose ``lse_rows`` entry is -inf (with ``dead_rows``) and, with
        ``finite_only``, non-finite values are staged as 0 so that a 0 weight never meets a NaN."""
        COLS = HEAD_DIM // G
        ROW_STRIDE = HEAD_DIM + 1

        @device.inline
        def product(acc, weights, x, first_row, limit_row, width, lse_rows, dead_rows, finite_only, buf, tid, tr,
                    tc):
            x_row = cuda.local.array(COLS, np.float32)
            w_col = U(tr * T)
            x_col = U(tc)
            for r0 in range(0, REDUCED, ROWS):
                cuda.syncthreads()  # weights are written; the previous slice is no longer read
                t = U(tid)
                while t < U(ROWS * HEAD_DIM):
                    r = t // U(HEAD_DIM)
                    c = t % U(HEAD_DIM)
                    row = U(first_row + r0) + r
                    val = np.float32(0.0)
                    if row < U(limit_row) and c < U(width) and not (dead_rows and lse_rows[U(r0) + r] == NEG_INF):
                        val = load(x[row, c])
                        if finite_only and not math.isfinite(val):
                            val = np.float32(0.0)
                    buf[r * U(ROW_STRIDE) + c] = val
                    t += U(NT)
                cuda.syncthreads()
                r = U(0)
                while r < U(ROWS):
                    for c in range(COLS):
                        x_row[c] = buf[r * U(ROW_STRIDE) + x_col + U(G * c)]
                    for a in range(T):
                        w = weights[U(r0) + r, w_col + U(a)]
                        for c in range(COLS):
                            acc[a, c] += w * x_row[c]
                    r += U(1)

        return product

    @device.inline
    def dropout_scale(words, a, j, i, bh, offset, seed_lo, seed_hi, threshold, rescale):
        """(Philox words of j's group, Z_ij) for keys j walked upwards from a == 0: one call per 4 keys."""
        if a == 0 or j % 4 == 0:
            words = device.philox_group(j, i, bh, offset, seed_lo, seed_hi)
        keep = device.pick_word(words, j) < np.uint64(threshold)
        return words, (rescale if keep else np.float32(0.0))

    # dP's tiles: summed in fp64 for fp32 inputs (Spec.wide)
    dp_tile = score_product(np.float64 if spec.wide else np.float32)
    return score_tile, dp_tile, gradient_product, dropout_scale


@functools.cache
def dq_kernel(spec: Spec, dmask_direct: bool, delta_from_out: bool):
    visible, key_range, _, sequence, batch_index, score, unmasked, contributor = _common(spec)
    score_tile, dp_tile, gradient_product, dropout_scale = _tile_ops(spec)
    DP = np.float64 if spec.wide else np.float32  # dP's and delta's sums (Spec.wide)
    load = device.loader(spec.bf16)
    store = device.storer(spec.bf16)
    store_mask = device.storer(spec.mask_bf16)
    G, SUB_N, SUB_M, BLOCK_N, BLOCK_M = spec.threads, spec.sub_n, spec.sub_m, spec.block_n, spec.block_m
    HEAD_DIM, COLS = spec.head_dim, spec.head_dim // spec.threads
    STAGE = stage_floats(spec)
    DROPOUT, DMASK_DIRECT, DELTA_FROM_OUT = spec.dropout, dmask_direct, delta_from_out
    DS_SHAPE = (BLOCK_N, BLOCK_M + 1)  # padded rows: a warp's column reads hit distinct banks
    dq_product = gradient_product(SUB_M, HEAD_DIM, BLOCK_N)
    FIRST_PHASE = 1 if delta_from_out else 0  # a constant: the pass-0 code is not generated at all

    @device.inline
    def reduce_partials(part, ds_tile, tr, tc):
        """part[b] becomes the total of the G threads' partials of query column tc + G * b, added in a fixed
        order (through ds_tile)."""
        cuda.syncthreads()  # ds_tile is no longer read (the previous rep's dq product, the previous reduction)
        for b in range(SUB_M):
            ds_tile[tr, tc + G * b] = part[b]
        cuda.syncthreads()
        for b in range(SUB_M):
            total = np.float32(0.0)
            for t in range(G):
                total += ds_tile[t, tc + G * b]
            part[b] = total
        cuda.syncthreads()  # the partials are read before they (or dS) are written over

    @device.inline
    def reduce_delta(delta_m, norm_m, lse_m, ds_tile, delta, lse, b0, b1, b2, h, q0, m_first, L_b, tr, tc):
        """delta_i and the row's normaliser sum_j P_ij from the per-thread partials; then lse_i is moved by
        log(sum_j P_ij) and delta_i divided by it, so that P = exp(s - lse) over the scores these kernels
        recompute sums to 1 (to rounding) and sum_j dS_ij cancels. The forward's lse comes from its own
        scores, the tensor_core loops' where they ran (fp32 there: TF32 products of split operands, not these
        fp32 FMAs), and against these scores its P summed to 1 + eps, eps ~1e-6: every dS of the row off by
        that factor and sum_j dS_ij = -delta_i eps (on the H200, fp32 float masks broadcast over the batch
        or the keys had dmask, dq and dk at 2-10x PyTorch's error). Both written out for the dk/dv and dmask
        kernels, launched after: lse into this backward's own copy (attention.backward passes one here)."""
        reduce_partials(delta_m, ds_tile, tr, tc)
        reduce_partials(norm_m, ds_tile, tr, tc)
        for b in range(SUB_M):
            if norm_m[b] > np.float32(0.0):  # a row that sees a finite score (NaN stays as it is)
                lse_m[b] = lse_m[b] + np.float32(math.log(norm_m[b]))
                delta_m[b] = delta_m[b] / norm_m[b]
            i = m_first + tc + G * b
            if tr == 0 and i < L_b:
                delta[b0, b1, b2, h, q0 + i] = delta_m[b]
                lse[b0, b1, b2, h, q0 + i] = lse_m[b]

    @device.kernel(_max_registers(spec))
    def attention_dq(q, k, v, mask, dout, out, lse, delta, dq, dmask, cu_q, cu_k, nb1, nb2, own1, own2, reps,
                     hq, group, L, S, E, Ev, scale, causal, lower_right, left, right, seed_lo, seed_hi, offset,
                     threshold, rescale):
        """dq_i = scale * sum_j dS_ij k_j for BLOCK_M query rows; q's own batch element sums every problem
        batch it was broadcast to (``reps`` of them, decoded by batch_of). Writes delta (out is read only
        with DELTA_FROM_OUT); without DELTA_FROM_OUT also lse, each block its own rows, moved to these scores'
        normaliser (reduce_delta): ``lse`` is then the backward's copy, not the forward's."""
        tid = cuda.threadIdx.x
        tr = tid // G
        tc = tid % G
        h = cuda.blockIdx.x % hq
        hk = h // group
        own = cuda.blockIdx.x // hq
        # the last query blocks first: under a causal band they see the most keys, and blocks start in grid
        # order, so the heavy ones start first rather than forming the tail (FlashAttention-2's order)
        m_first = (cuda.gridDim.y - 1 - cuda.blockIdx.y) * BLOCK_M
        scale32 = np.float32(scale)
        drop_scale = np.float32(rescale)
        buf = cuda.shared.array(STAGE, np.float32)
        ds_tile = cuda.shared.array(DS_SHAPE, np.float32)  # dS[n, m]; rows 0..G-1 also reduce delta
        s_acc = cuda.local.array((SUB_N, SUB_M), np.float32)
        dp_acc = cuda.local.array((SUB_N, SUB_M), DP)
        lse_m = cuda.local.array(SUB_M, np.float32)  # of queries m_first + tc + G * b
        delta_m = cuda.local.array(SUB_M, DP)
        norm_m = cuda.local.array(SUB_M, np.float32)  # pass 0: sum_j P_ij
        dq_acc = cuda.local.array((SUB_M, COLS), np.float32)  # rows m_first + tr * SUB_M + a, cols tc + G * c
        for a in range(SUB_M):
            for c in range(COLS):
                dq_acc[a, c] = np.float32(0.0)
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
            qx, dox, kx, vx = q[b0, b1, b2, h], dout[b0, b1, b2, h], k[b0, b1, b2, hk], v[b0, b1, b2, hk]
            for b in range(SUB_M):
                i = m_first + tc + G * b
                lse_m[b] = lse[b0, b1, b2, h, q0 + i] if i < L_b else np.float32(NEG_INF)
                delta_m[b] = DP(0.0)
                norm_m[b] = np.float32(0.0)
            lo, hi = key_range(m_first, min(L_b, m_first + BLOCK_M) - 1, causal, shift, S_b, left, right)
            if DELTA_FROM_OUT:
                # rowsum(dout * out), each of the G threads of a query column summing the whole row in column
                # order, as score_tile sums dP: a row that sees one key has out == v there, so delta equals dP
                # bit for bit and dS is exactly 0, as autograd's softmax gives. Once per block: cheap beside
                # the key walk.
                ox = out[b0, b1, b2, h]
                for b in range(SUB_M):
                    i = m_first + tc + G * b
                    if i < L_b and lse_m[b] != NEG_INF:
                        for e in range(Ev):
                            delta_m[b] += DP(load(dox[q0 + i, e])) * DP(load(ox[q0 + i, e]))
                    delta_m[b] = np.float32(delta_m[b])  # as dP is rounded below
                    if tr == 0 and i < L_b:
                        delta[b0, b1, b2, h, q0 + i] = delta_m[b]
            # Pass 0 (only without DELTA_FROM_OUT) sums delta_i's partials over the key tiles, rowsum(P * dP), and
            # reduces them; pass 1 forms dS and dQ.
            for phase in range(FIRST_PHASE, 2):
                for n0 in range(lo // BLOCK_N * BLOCK_N, hi, BLOCK_N):
                    score_tile(s_acc, kx, k0 + n0, k0 + S_b, qx, q0 + m_first, q0 + L_b, E, buf, tid, tr, tc)
                    dp_tile(dp_acc, vx, k0 + n0, k0 + S_b, dox, q0 + m_first, q0 + L_b, Ev, buf, tid, tr, tc)
                    for b in range(SUB_M):
                        i = m_first + tc + G * b
                        words = (np.uint64(0), np.uint64(0), np.uint64(0), np.uint64(0))
                        for a in range(SUB_N):
                            j = n0 + tr * SUB_N + a
                            z = np.float32(1.0)
                            if DROPOUT:
                                words, z = dropout_scale(words, a, j, i, bh, offset, seed_lo, seed_hi, threshold,
                                                         drop_scale)
                            ds = np.float32(0.0)
                            if j < S_b and lse_m[b] != NEG_INF and visible(i, j, causal, shift, left, right) and \
                                    unmasked(mask, b0, b1, b2, h, i, j):
                                s = np.float32(score(mask, b0, b1, b2, h, i, j, s_acc[a, b] * scale32))
                                if s != NEG_INF:
                                    p = np.float32(math.exp(s - lse_m[b]))
                                    dpz = np.float32(dp_acc[a, b]) * z
                                    if phase == 0:
                                        delta_m[b] += p * dpz
                                        norm_m[b] += p
                                    else:
                                        ds = p * (dpz - np.float32(delta_m[b]))
                                        if DMASK_DIRECT:
                                            dmask[b0, b1, b2, h, i, j] = store_mask(ds)
                            if phase == 1:
                                ds_tile[tr * SUB_N + a, tc + G * b] = ds
                    if phase == 1:
                        dq_product(dq_acc, ds_tile, kx, k0 + n0, k0 + S_b, E, lse_m, False, True, buf, tid, tr, tc)
                if phase == 0:
                    reduce_delta(delta_m, norm_m, lse_m, ds_tile, delta, lse, b0, b1, b2, h, q0, m_first, L_b, tr,
                                 tc)
        for a in range(SUB_M):
            i = m_first + tr * SUB_M + a
            if i < L_b:
                for c in range(COLS):
                    e = tc + G * c
                    if e < E:
                        dq[o0, o1, o2, h, q0 + i, e] = store(dq_acc[a, c] * scale32)

    return attention_dq


@functools.cache
def dkdv_kernel(spec: Spec):
    visible, _, query_range, sequence, batch_index, score, unmasked, contributor = _common(spec)
    score_tile, dp_tile, gradient_product, dropout_scale = _tile_ops(spec)
    DP = np.float64 if spec.wide else np.float32  # dP's and delta's sums (Spec.wide)
    store = device.storer(spec.bf16)
    G, SUB_N, SUB_M, BLOCK_N, BLOCK_M = spec.threads, spec.sub_n, spec.sub_m, spec.block_n, spec.block_m
    HEAD_DIM, HEAD_DIM_V = spec.head_dim, spec.head_dim_v
    COLS, COLS_V = HEAD_DIM // G, HEAD_DIM_V // G
    STAGE = stage_floats(spec)
    DROPOUT = spec.dropout
    WEIGHTS_SHAPE = (BLOCK_M, BLOCK_N + 1)
    dk_product = gradient_product(SUB_N, HEAD_DIM, BLOCK_M)
    dv_product = gradient_product(SUB_N, HEAD_DIM_V, BLOCK_M)

    @device.kernel(_max_registers(spec))
    def attention_dkdv(q, k, v, mask, dout, lse, delta, dk, dv, cu_q, cu_k, nb1, nb2, own1, own2, reps,
                       want_dk, want_dv, hq, hkv, group, L, S, E, Ev, scale, causal, lower_right, left, right,
                       seed_lo, seed_hi, offset, threshold, rescale):
        """dv_j = sum_i A_ij dout_i and dk_j = scale * sum_i dS_ij q_i for BLOCK_N key rows, over the query
        heads of their GQA group and every problem batch their own batch element was broadcast to."""
        tid = cuda.threadIdx.x
        tr = tid // G
        tc = tid % G
        hk = cuda.blockIdx.x % hkv
        own = cuda.blockIdx.x // hkv
        n_first = cuda.blockIdx.y * BLOCK_N
        scale32 = np.float32(scale)
        drop_scale = np.float32(rescale)
        buf = cuda.shared.array(STAGE, np.float32)
        weights = cuda.shared.array(WEIGHTS_SHAPE, np.float32)  # (P * Z)^T, then dS^T, as [m, n]
        lse_tile = cuda.shared.array(BLOCK_M, np.float32)
        delta_tile = cuda.shared.array(BLOCK_M, np.float32)
        s_acc = cuda.local.array((SUB_N, SUB_M), np.float32)  # S, then dS, of keys tr * SUB_N + a, queries tc + G * b
        dp_acc = cuda.local.array((SUB_N, SUB_M), DP)
        dk_acc = cuda.local.array((SUB_N, COLS), np.float32)  # rows n_first + tr * SUB_N + a, cols tc + G * c
        dv_acc = cuda.local.array((SUB_N, COLS_V), np.float32)
        for a in range(SUB_N):
            for c in range(COLS):
                dk_acc[a, c] = np.float32(0.0)
            for c in range(COLS_V):
                dv_acc[a, c] = np.float32(0.0)
        o0, o1, o2 = batch_index(own, own1, own2)
        k0 = 0
        S_b = S
        for rep in range(reps):
            b0, b1, b2, flat = contributor(own, rep, own1, own2, nb1, nb2)
            q0, L_b, k0, S_b = sequence(cu_q, cu_k, flat, L, S)
            if n_first >= S_b:
                break  # uniform over the block; only varlen (reps == 1) gets here
            shift = S_b - L_b if lower_right else 0
            kx, vx = k[b0, b1, b2, hk], v[b0, b1, b2, hk]
            lo, hi = query_range(n_first, min(S_b, n_first + BLOCK_N) - 1, causal, shift, L_b, left, right)
            for h in range(hk * group, hk * group + group):
                bh = flat * hq + h
                qx, dox = q[b0, b1, b2, h], dout[b0, b1, b2, h]
                for m0 in range(lo // BLOCK_M * BLOCK_M, hi, BLOCK_M):
                    # lse/delta of the previous tile were last read before the previous product's syncs
                    for r in range(tid, BLOCK_M, G * G):
                        ok = m0 + r < L_b
                        lse_tile[r] = lse[b0, b1, b2, h, q0 + m0 + r] if ok else np.float32(NEG_INF)
                        delta_tile[r] = delta[b0, b1, b2, h, q0 + m0 + r] if ok else np.float32(0.0)
                    score_tile(s_acc, kx, k0 + n_first, k0 + S_b, qx, q0 + m0, q0 + L_b, E, buf, tid, tr, tc)
                    dp_tile(dp_acc, vx, k0 + n_first, k0 + S_b, dox, q0 + m0, q0 + L_b, Ev, buf, tid, tr, tc)
                    for b in range(SUB_M):
                        i = m0 + tc + G * b
                        lse_i = lse_tile[tc + G * b]
                        words = (np.uint64(0), np.uint64(0), np.uint64(0), np.uint64(0))
                        for a in range(SUB_N):
                            j = n_first + tr * SUB_N + a
                            z = np.float32(1.0)
                            if DROPOUT:
                                words, z = dropout_scale(words, a, j, i, bh, offset, seed_lo, seed_hi, threshold,
                                                         drop_scale)
                            pz = np.float32(0.0)
                            ds = np.float32(0.0)
                            if j < S_b and lse_i != NEG_INF and visible(i, j, causal, shift, left, right) and \
                                    unmasked(mask, b0, b1, b2, h, i, j):
                                s = np.float32(score(mask, b0, b1, b2, h, i, j, s_acc[a, b] * scale32))
                                if s != NEG_INF:
                                    p = np.float32(math.exp(s - lse_i))
                                    pz = p * z
                                    ds = p * (np.float32(dp_acc[a, b]) * z - delta_tile[tc + G * b])
                            weights[tc + G * b, tr * SUB_N + a] = pz
                            s_acc[a, b] = ds
                    if want_dv:
                        dv_product(dv_acc, weights, dox, q0 + m0, q0 + L_b, Ev, lse_tile, True, False, buf, tid, tr, tc)
                    if want_dk:
                        cuda.syncthreads()  # the dV product has read P^T
                        for b in range(SUB_M):
                            for a in range(SUB_N):
                                weights[tc + G * b, tr * SUB_N + a] = s_acc[a, b]
                        dk_product(dk_acc, weights, qx, q0 + m0, q0 + L_b, E, lse_tile, True, False, buf, tid, tr, tc)
        for a in range(SUB_N):
            j = n_first + tr * SUB_N + a
            if j < S_b:
                for c in range(COLS):
                    e = tc + G * c
                    if want_dk and e < E:
                        dk[o0, o1, o2, hk, k0 + j, e] = store(dk_acc[a, c] * scale32)
                for c in range(COLS_V):
                    d = tc + G * c
                    if want_dv and d < Ev:
                        dv[o0, o1, o2, hk, k0 + j, d] = store(dv_acc[a, c])

    return attention_dkdv


@functools.cache
def dmask_kernel(spec: Spec):
    load = device.loader(spec.bf16)
    visible, _, _, _, _, score = _common(spec)[:6]
    store_mask = device.storer(spec.mask_bf16)
    DROPOUT, BLOCK = spec.dropout, spec.threads * spec.threads
    DP = np.float64 if spec.wide else np.float32  # dP's sums, as the dq kernel's (Spec.wide)

    @cuda.jit
    def attention_dmask(q, k, v, mask, dout, lse, delta, dmask, dshape, full, group, E, Ev, scale, causal,
                        lower_right, left, right,
                        seed_lo, seed_hi, offset, threshold, rescale):
        """One thread per element of a broadcast float mask's gradient: the sum of dS over every score
        the element was added to, recomputed pair by pair in a fixed order (no atomics), each dS in fp32 as
        the other kernels form it (dP summed as theirs are), their sum in fp64: the sum runs over up to batch x
        heads x L (or S) scores one after another, where an fp32 total would gather a rounding of the running
        total per score (PyTorch's sum_to_size adds pairwise) -- and on a key-broadcast mask those dS cancel to
        ~0, so the rounding is all of the result."""
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
        total = np.float64(0.0)
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
            s = np.float32(score(mask, b0, b1, b2, h, i, j, dot * scale32))
            if s == NEG_INF:
                continue
            p = np.float32(math.exp(s - lse_i))
            dp_sum = DP(0.0)
            for d in range(Ev):
                dp_sum += DP(load(dout[b0, b1, b2, h, i, d])) * DP(load(v[b0, b1, b2, hk, j, d]))
            dp = np.float32(dp_sum)
            if DROPOUT:
                bh = ((b0 * full[1] + b1) * full[2] + b2) * full[3] + h
                dp *= device.keep_scale(j, i, bh, offset, seed_lo, seed_hi, threshold, drop_scale)
            total += np.float64(p * (dp - delta[b0, b1, b2, h, i]))
        dmask[own[0], own[1], own[2], own[3], own[4], own[5]] = store_mask(np.float32(total))

    return attention_dmask
