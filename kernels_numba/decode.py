"""Split-KV attention over a KV cache (flash-decoding) in Numba CUDA: few queries against long cached keys.

``cusdpa.kv_cache_attention``'s layouts: query (B, Lq, Hq, E); the cache (rows, slots, Hkv, E/Ev), a
sequence's position p at (row b or cache_batch_idx[b], slot p), or, paged, at (block_table[b, p //
block_size], p % block_size); ``seqlens[b]`` keys per sequence (new tokens already written).

``partial``: grid (splits, B * Hkv), one CTA per split of a sequence's keys and kv head; it holds the
group's query rows (Hq / Hkv heads x Lq queries, R <= MAX_ROWS) and reads its keys once, in tiles of
THREADS keys: each thread scores one key against every row (cache read in place, through the block
table), the rows' online softmax is kept by one thread per row (running max m, sum l), and each thread
accumulates its output columns over the tile. It writes the split's unnormalised output and (m, l).
``combine``: one CTA per (batch, query head, query) merges the splits exactly: M = max m_s, out = sum_s
o_s e^(m_s - M) / sum_s l_s e^(m_s - M), lse = M + log(sum). Scores are in natural units (exp, not
exp2), fp32 throughout.

Visibility, per query l at position p = seqlens[b] - Lq + l (bottom-right): keys j < seqlens[b]; causal:
j <= p; window (left, right): j >= p - left, j <= p + right (-1 unbounded). softcap and ALiBi (slope *
|p - j| subtracted) as the reference applies them. A query that sees nothing gets 0 and lse -inf; NaN
where a query looks propagates, as in the reference (only visible keys are touched).
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda

from . import device
from .device import NEG_INF

THREADS = 64  # keys per tile, one per thread
MAX_ROWS = 16  # query rows of a CTA (query heads of a group x queries)
MAX_COLUMNS = 4  # output columns per thread: Ev <= THREADS * MAX_COLUMNS
MAX_HEAD_DIM = THREADS * MAX_COLUMNS


@functools.cache
def partial_kernel(bf16: bool, paged: bool, causal: bool, softcap: bool, alibi: bool):
    load = device.loader(bf16)

    @cuda.jit
    def partial(q, k_cache, v_cache, table, rows_of, seqlens, slopes, o_part, m_part, l_part, Hq, Hkv, Lq, E, Ev,
                chunk, block_size, scale, cap, left, right):
        split = cuda.blockIdx.x
        b = cuda.blockIdx.y // Hkv
        kvh = cuda.blockIdx.y % Hkv
        t = cuda.threadIdx.x
        group = Hq // Hkv
        R = group * Lq
        n_keys = seqlens[b]
        start = split * chunk
        stop = min(start + chunk, n_keys)

        q_sm = cuda.shared.array((MAX_ROWS, MAX_HEAD_DIM), np.float32)
        p_sm = cuda.shared.array((MAX_ROWS, THREADS), np.float32)
        m_sm = cuda.shared.array(MAX_ROWS, np.float32)
        l_sm = cuda.shared.array(MAX_ROWS, np.float32)
        alpha_sm = cuda.shared.array(MAX_ROWS, np.float32)
        slot_sm = cuda.shared.array((THREADS, 2), np.int64)  # each tile key's (row, slot) in the cache
        for x in range(t, R * E, THREADS):  # row r = query head kvh * group + r // Lq, query r % Lq
            r, e = x // E, x % E
            q_sm[r, e] = load(q[b, r % Lq, kvh * group + r // Lq, e])
        if t < R:
            m_sm[t] = NEG_INF
            l_sm[t] = 0.0
        o = cuda.local.array((MAX_ROWS, MAX_COLUMNS), np.float32)
        for r in range(MAX_ROWS):
            for c in range(MAX_COLUMNS):
                o[r, c] = 0.0
        cuda.syncthreads()

        for tile in range(start, stop, THREADS):
            j = tile + t
            if j < stop:
                if paged:
                    slot_sm[t, 0] = table[b, j // block_size]
                    slot_sm[t, 1] = j % block_size
                else:
                    slot_sm[t, 0] = rows_of[b]
                    slot_sm[t, 1] = j
            cuda.syncthreads()
            # key j against every row: one pass over its elements (each read once), then the row's rules
            dots = cuda.local.array(MAX_ROWS, np.float32)
            for r in range(MAX_ROWS):
                dots[r] = 0.0
            if j < stop:
                for e in range(E):
                    kv = load(k_cache[slot_sm[t, 0], slot_sm[t, 1], kvh, e])
                    for r in range(R):
                        dots[r] += q_sm[r, e] * kv
            for r in range(R):  # -inf where the row does not see key j
                s = NEG_INF
                pos = n_keys - Lq + r % Lq
                if j < stop and not (causal and j > pos) and not (left >= 0 and j < pos - left) \
                        and not (right >= 0 and j > pos + right):
                    s = dots[r] * scale
                    if softcap:
                        s = cap * math.tanh(s / cap)
                    if alibi:
                        s -= slopes[b, kvh * group + r // Lq] * abs(pos - j)
                p_sm[r, t] = s
            cuda.syncthreads()
            if t < R:  # the row's online softmax over the tile
                m_old = m_sm[t]
                m_new = m_old
                for c in range(THREADS):
                    s = p_sm[t, c]
                    if s != s or m_new != m_new:
                        m_new = s if s != s else m_new
                    elif s > m_new:
                        m_new = s
                m_use = 0.0 if m_new == NEG_INF else m_new
                alpha = math.exp(m_old - m_use)
                total = np.float32(0.0)
                for c in range(THREADS):
                    p = math.exp(p_sm[t, c] - m_use)
                    p_sm[t, c] = p
                    total += p
                m_sm[t] = m_new
                l_sm[t] = l_sm[t] * alpha + total
                alpha_sm[t] = alpha
            cuda.syncthreads()
            for r in range(R):  # this thread's output columns over the tile's visible keys
                for c in range(MAX_COLUMNS):
                    e = t + c * THREADS
                    if e < Ev:
                        acc = o[r, c] * alpha_sm[r]
                        for x in range(min(THREADS, stop - tile)):
                            p = p_sm[r, x]
                            if p != 0.0:  # unseen keys are skipped, never multiplied by 0
                                acc += p * load(v_cache[slot_sm[x, 0], slot_sm[x, 1], kvh, e])
                        o[r, c] = acc
            cuda.syncthreads()

        for r in range(R):
            h, l = kvh * group + r // Lq, r % Lq
            for c in range(MAX_COLUMNS):
                e = t + c * THREADS
                if e < Ev:
                    o_part[split, b, h, l, e] = o[r, c]
            if t == 0:
                m_part[split, b, h, l] = m_sm[r]
                l_part[split, b, h, l] = l_sm[r]

    return partial


@cuda.jit
def combine(o_part, m_part, l_part, out, lse, Hq, Lq, Ev):
    """out (B, Lq, Hq, Ev) fp32 and lse (B, Hq, Lq) of the exactly merged splits; one CTA per (b, h, l)."""
    x = cuda.blockIdx.x
    b, h, l = x // (Hq * Lq), (x // Lq) % Hq, x % Lq
    splits = m_part.shape[0]
    top = NEG_INF
    for s in range(splits):
        m = m_part[s, b, h, l]
        if m != m or top != top:
            top = m if m != m else top
        elif m > top:
            top = m
    use = 0.0 if top == NEG_INF else top
    total = np.float32(0.0)
    for s in range(splits):
        total += l_part[s, b, h, l] * math.exp(m_part[s, b, h, l] - use)
    for e in range(cuda.threadIdx.x, Ev, cuda.blockDim.x):
        acc = np.float32(0.0)
        for s in range(splits):
            w = math.exp(m_part[s, b, h, l] - use)
            if w != 0.0:
                acc += o_part[s, b, h, l, e] * w
        out[b, l, h, e] = 0.0 if total == 0.0 else acc / total
    if cuda.threadIdx.x == 0:
        lse[b, h, l] = NEG_INF if total == 0.0 else use + math.log(total)


def applies(query_shape, k_cache_shape, v_cache_shape, dtype_name: str) -> bool:
    """Whether these kernels take a call: rows of a CTA, head dims and dtype within their limits."""
    (_, Lq, Hq, E), Hkv, Ev = query_shape, k_cache_shape[2], v_cache_shape[3]
    return (dtype_name in ("float16", "bfloat16", "float32") and Hkv > 0 and Hq % Hkv == 0
            and Lq * (Hq // Hkv) <= MAX_ROWS and 0 < E <= MAX_HEAD_DIM and 0 < Ev <= MAX_HEAD_DIM)


def run(xp, query, k_cache, v_cache, table, rows_of, seqlens, max_len: int, slopes, *, causal: bool, left: int,
        right: int, scale: float, softcap: float):
    """(out (B, Lq, Hq, Ev) fp32, lse (B, Hq, Lq)) over the cache; ``table`` (B, blocks) int32 for a paged
    cache else None, ``rows_of`` (B,) int32 the contiguous cache's rows, ``seqlens`` (B,) int32 on the
    device, ``max_len`` their maximum, ``slopes`` float32 (B, Hq) or None."""
    from . import launcher, layout

    B, Lq, Hq, E = query.shape
    Hkv, Ev = k_cache.shape[2], v_cache.shape[3]
    # enough splits to give every SM two CTAs, none shorter than a tile
    sms = 132 if device.SIMULATOR else cuda.get_current_device().MULTIPROCESSOR_COUNT
    splits = max(1, min(-(-max_len // THREADS), -(-2 * sms // max(1, B * Hkv))))
    chunk = -(-max(max_len, 1) // splits)
    chunk = -(-chunk // THREADS) * THREADS
    splits = max(1, -(-max(max_len, 1) // chunk))
    o_part = xp.empty((splits, B, Hq, Lq, Ev), dtype=np.float32)
    m_part = xp.empty((splits, B, Hq, Lq), dtype=np.float32)
    l_part = xp.empty((splits, B, Hq, Lq), dtype=np.float32)
    out = xp.empty((B, Lq, Hq, Ev), dtype=np.float32)
    lse = xp.empty((B, Hq, Lq), dtype=np.float32)
    dummy = layout.placeholder(xp, (1, 1), np.int32)
    kernel = partial_kernel(query.dtype.name == "bfloat16", table is not None, causal, softcap > 0, slopes is not None)
    arrays = [layout.bits(x) for x in (
        query, k_cache, v_cache, dummy if table is None else table, dummy[0] if rows_of is None else rows_of,
        seqlens, layout.placeholder(xp, (1, 1), np.float32) if slopes is None else slopes, o_part, m_part, l_part)]
    on = layout.device_of(query)
    launcher.launch(kernel, (splits, B * Hkv), THREADS, on,
                    (*arrays, Hq, Hkv, Lq, E, Ev, chunk, k_cache.shape[1], np.float32(scale),
                     np.float32(softcap or 1.0), left, right))
    launcher.launch(combine, B * Hq * Lq, min(THREADS, Ev), on, (o_part, m_part, l_part, out, lse, Hq, Lq, Ev))
    return out, lse
