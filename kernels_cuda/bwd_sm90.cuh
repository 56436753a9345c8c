// What the Hopper backward kernels share (flash_bwd_sm90.cu: E, Ev up to 128; flash_bwd_sm90_wide.cu: up
// to 256): their wgmma products over swizzled tiles, the dS^T exchange tile, the producer's loads, the
// order of a CTA's steps and of the deterministic reductions, the dropout keep bits, the dK/dV stores and
// the dQ conversion. Include after sm90.cuh and the source's wgmma wrappers.
#pragma once

// Dropout keep bits of a thread's S^T elements x = nt * 4 + 2 r + c (key j + 8 r, query i0 + nt * 8 + c),
// bit x of the result. One Philox call gives the words of 4 consecutive keys for one query, and the four
// lanes g % 4 = u of a quad group (same t, same g / 4) hold those 4 keys: lane u makes the call of element
// 2 r + c = u of each n8 tile and compares its 4 words, and the lanes gather each other's bit u. A loop,
// not unrolled: the calls' registers would crowd out S^T's and dP^T's.
template <int QT>
__device__ __forceinline__ unsigned long long dropout_keep_bits(const Dropout& drop, u32 bh, int j, int i0, int lane) {
    static_assert(QT * 4 <= 64, "one bit per element");
    const int u = lane / 4 % 4;
    const u32 jw = static_cast<u32>(j + 8 * (u >> 1)) >> 2;
    unsigned long long keep = 0;
#pragma unroll 1
    for (int nt = 0; nt < QT; ++nt) {
        const uint4 r = philox4x32_10(make_uint4(jw, static_cast<u32>(i0 + nt * 8 + (u & 1)), bh, drop.offset),
                                      drop.key0, drop.key1);
        const u32 nibble = u32(r.x < drop.threshold) | u32(r.y < drop.threshold) << 1 |
                           u32(r.z < drop.threshold) << 2 | u32(r.w < drop.threshold) << 3;
#pragma unroll
        for (int src = 0; src < 4; ++src) {
            const u32 theirs = __shfl_sync(0xffffffffu, nibble, (lane & ~12) | (src << 2));
            keep |= static_cast<unsigned long long>((theirs >> u) & 1u) << (nt * 4 + src);
        }
    }
    return keep;
}

// Z = keep / (1 - p) of a thread's S^T elements (bit i of the keep bits for element i); the identity
// without dropout. dV takes (P o Z)^T, dS^T = P^T o (dP^T o Z^T - D).
struct DropScale {
#if IS_DROPOUT
    unsigned long long keep;
    float rp;
    __device__ __forceinline__ float operator()(float v, int i) const { return (keep >> i) & 1u ? v * rp : 0.f; }
#else
    __device__ __forceinline__ float operator()(float v, int) const { return v; }
#endif
};

// The step's DropScale of a thread whose S^T elements are keys j, j + 8 and queries i0 + nt * 8 (+ 1) of
// query head bh: its keep bits computed at the start of the step, while the tiles may still be on their
// way and before S^T and dP^T hold their registers.
template <int QT>
__device__ __forceinline__ DropScale drop_scale(u32 seed_lo, u32 seed_hi, u32 offset, u32 threshold, float rp, u32 bh,
                                                int j, int i0, int lane) {
#if IS_DROPOUT
    return DropScale{dropout_keep_bits<QT>(Dropout{seed_lo, seed_hi, offset, threshold}, bh, j, i0, lane), rp};
#else
    (void)seed_lo, (void)seed_hi, (void)offset, (void)threshold, (void)rp, (void)bh, (void)j, (void)i0, (void)lane;
    return DropScale{};
#endif
}

// attn_mask (ATTN_MASK: 1 bool, a byte per pair, nonzero = attend; 2 float16, 3 bfloat16, 4 float32, added to
// the scaled scores as the forward added it, in natural units; a float mask's gradient is EFFICIENT's): bit x
// of mask_bits says whether element x of a thread's S^T (key j + 8 r, query i0 + nt * 8 + 2 t + c, x = nt * 4
// + 2 r + c) attends; mask_values gives a float mask's elements there. `mask` points at the (batch, query
// head) slice; rows past L and keys past S read row L - 1 and key S - 1 (in bounds; the visibility rule
// selects those elements out).
// NATURAL (sm90.cuh): probabilities from natural-unit scores (sLse holds lse itself): a float mask, ALiBi
// (FlashAttention's: -slope * |i + S - L - j| added to score (i, j), as the forward added it) or soft-capping
// (the scaled score x replaced by softcap * tanh(x / softcap) first, whose derivative 1 - tanh^2 multiplies dS)

// The score modifiers of a step: ALiBi's slope of the step's head; soft-capping's softcap and
// cap_k = 2 log2(e) scale / softcap (the forward's soft_cap).
struct Modifiers {
    float slope, cap_k, softcap;
};
#if ATTN_MASK == 2
__device__ __forceinline__ float mask_float(mask_t x) { return __half2float(x); }
#elif ATTN_MASK == 3
__device__ __forceinline__ float mask_float(mask_t x) { return __bfloat162float(x); }
#else
__device__ __forceinline__ float mask_float(mask_t x) { return x; }
#endif

// `read` false (a dense step): every load reads one byte that attends (ATTEND_ALL, in L1 after the first
// step), so every bit is set at L1 latency. Neither a branch around the loads (its join made the consumers
// wait for them before S^T: a dense bool mask's backward lost 21% on the H200) nor predicated loads (their
// values spilled) served.
__device__ const unsigned char ATTEND_ALL = 1;
template <int QT>
__device__ __forceinline__ unsigned long long mask_bits(const mask_t* mask, long long m_sm, int L, int S, int j, int i0,
                                                        int t, bool read) {
    static_assert(QT * 4 <= 64, "one bit per element");
    const mask_t* all = reinterpret_cast<const mask_t*>(&ATTEND_ALL);
    const mask_t* keys[2] = {read ? mask + min(j, S - 1) : all, read ? mask + min(j + 8, S - 1) : all};
    m_sm = read ? m_sm : 0;
    unsigned long long bits = 0;
#pragma unroll
    for (int nt = 0; nt < QT; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
            const long long row = min(i0 + nt * 8 + 2 * t + c, L - 1) * m_sm;
#pragma unroll
            for (int r = 0; r < 2; ++r)
                bits |= static_cast<unsigned long long>(keys[r][row] != 0) << (nt * 4 + 2 * r + c);
        }
    return bits;
}

// A float mask's elements of a thread's S^T, in mask_bits' order (nt tiles [PART, PART + 1) * QT / PARTS): a
// 16-bit mask's two to a register (c = 0 in the low half), a float32 mask's one, half of them at a time
// (MASK_PARTS): at E = 128 a register per element left the products too few and ptxas serialised them
// (C7512).
constexpr int MASK_PACK = ATTN_MASK == 4 ? 1 : 2;  // elements per register
constexpr int MASK_PARTS = ATTN_MASK == 4 ? 2 : 1;
#if ATTN_MASK == 4
typedef float mask_reg_t;
#else
typedef u32 mask_reg_t;
#endif
template <int QT, int PART, int PARTS>
__device__ __forceinline__ void mask_values(const mask_t* mask, long long m_sm, int L, int S, int j, int i0, int t,
                                            mask_reg_t (&mv)[QT * 4 / MASK_PACK / PARTS]) {
    const mask_t* keys[2] = {mask + min(j, S - 1), mask + min(j + 8, S - 1)};
    constexpr int NT0 = PART * QT / PARTS;
#pragma unroll
    for (int nt = NT0; nt < NT0 + QT / PARTS; ++nt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const long long row0 = min(i0 + nt * 8 + 2 * t, L - 1) * m_sm;
            const long long row1 = min(i0 + nt * 8 + 2 * t + 1, L - 1) * m_sm;
#if ATTN_MASK == 4
            mv[(nt - NT0) * 4 + 2 * r] = keys[r][row0];
            mv[(nt - NT0) * 4 + 2 * r + 1] = keys[r][row1];
#elif ATTN_MASK >= 2
            const unsigned short* k16 = reinterpret_cast<const unsigned short*>(keys[r]);
            mv[(nt - NT0) * 2 + r] = k16[row0] | (static_cast<u32>(k16[row1]) << 16);
#endif
        }
}

// Element x of mask_values' registers as a float.
template <int N>
__device__ __forceinline__ float mask_at(const mask_reg_t (&mv)[N], int x) {
#if ATTN_MASK == 4
    return mv[x];
#elif ATTN_MASK == 3
    return __uint_as_float(x % 2 ? mv[x / 2] & 0xffff0000u : mv[x / 2] << 16);
#elif ATTN_MASK == 2
    return __half2float(__ushort_as_half(static_cast<unsigned short>(x % 2 ? mv[x / 2] >> 16 : mv[x / 2])));
#else
    return 0.f * x * N;  // no float mask: never asked
#endif
}

// P^T in place of a thread's S^T elements (key j + 8 r, query c0 + nt * 8 + 2 t + c at [nt * 4 + 2 r + c]):
// exp2(S^T scale log2 e - lse log2 e), sLse holding lse log2 e from column c0, the product rounded before
// the subtraction as the forward rounded the row max: one fmaf would give the max element of a row with
// huge scores exp2 of the product's rounding error (inf at |lse| ~ 1e12) instead of 1.
// MASKED (a tile not every pair of which is visible): an unseen pair gets -0, so that dS^T is selected out
// there too (gradients_t) rather than computed as P^T times dP^T - D, since dP^T may be inf where a key is
// unseen (a seen P^T is never -0); the visibility rule as limits: key j + 8 r is seen by queries
// [lo_r, hi_r) (none past S), two compares an element, and the attn_mask's bits (`attend`, mask_bits).
// Full tiles without a mask skip both: at E = 64 the compares and selects were a third of a step's
// instructions.
// PART of PARTS: elements [PART, PART + 1) * QT * 4 / PARTS only, whose float mask values `mv` holds.
// SOFTCAP: each element's 1 - tanh^2 into cg, as float16 pairs (element x in half x % 2 of cg[x / 2]).
template <int QT, bool MASKED, int PART = 0, int PARTS = 1>
__device__ __forceinline__ void probabilities_t(float (&s)[QT * 4], const Visibility<int>& vis, int j, int c0, int t,
                                                const float* sLse, float scale_log2, unsigned long long attend,
                                                const mask_reg_t (&mv)[QT * 4 / MASK_PACK / PARTS],
                                                const Modifiers& mod, u32 (&cg)[QT * 2]) {
    constexpr int X0 = PART * QT * 4 / PARTS;
    int lo[2], hi[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        vis.query_range(j + 8 * r, j + 8 * r + 1, lo[r], hi[r]);
        lo[r] -= c0 + 2 * t;
        hi[r] = j + 8 * r < vis.S ? hi[r] - c0 - 2 * t : lo[r];
    }
#pragma unroll
    for (int x = X0; x < X0 + QT * 4 / PARTS; ++x) {
        const int off = x / 4 * 8 + x % 2, col = off + 2 * t;
        // a float mask: natural units, s * scale + mask - lse rounded before the log2 e (a dtype-min mask would
        // overflow to -inf in the log2 domain, as the forward explains)
        float add = FLOAT_MASK ? mask_at(mv, x - X0) : 0.f;
        if (ALIBI)  // key j + 8 r, query c0 + col
            add += -mod.slope * static_cast<float>(abs(c0 + col + vis.S - vis.L - (j + 8 * (x % 4 / 2))));
        float score;  // natural units (NATURAL)
        if (SOFTCAP) {  // as the forward's soft_cap, keeping 1 - tanh^2 for dS
            const float th = 1.f - 2.f / (exp2f(s[x] * mod.cap_k) + 1.f);
            const u32 h = __half_as_ushort(__float2half_rn(1.f - th * th));
            cg[x / 2] = x % 2 ? (cg[x / 2] & 0xffffu) | (h << 16) : (cg[x / 2] & 0xffff0000u) | h;
            score = mod.softcap * th + add;
        } else {
            score = fmaf(s[x], scale_log2 * LN2, add);
        }
        const float p = NATURAL ? exp2f(__fmul_rn(score - sLse[col], LOG2E)) : exp2f(__fmul_rn(s[x], scale_log2) - sLse[col]);
        // the mask's term only where there is one: a constant ~0 attend still made ptxas serialise every
        // wgmma of the kernel (C7511)
        const bool attends = !ATTN_MASK || (FLOAT_MASK ? add != -CUSDPA_INF : ((attend >> x) & 1u));
        s[x] = !MASKED || (off >= lo[x % 4 / 2] && off < hi[x % 4 / 2] && attends) ? p : -0.f;
    }
}

// The float attn_mask's gradient (MASK_GRAD): dS itself, the gradient of the natural-unit score the mask was
// added to (before soft-capping's factor, which belongs to the scaled product), stored in fp32 for every
// element of a step into a (batch, query head, L, S) buffer the host zeroed and sums over the mask's broadcast
// dims afterwards (as PyTorch's gradient of an expanded bias). `row`: the thread's first element, query
// c0 + 2 t and key j; element (nt, r, c) at (nt * 8 + c) * S + 8 r, stored where nt * 8 + c < rows (queries
// left before L) and 8 r < keys (keys left before S). Each element of the buffer belongs to one step of one
// CTA: plain stores, deterministic.
#ifndef MASK_GRAD
#define MASK_GRAD 0
#endif
struct MaskGrad {
    float* row;
    long long S;
    int rows, keys;
};

// (P o Z)^T and dS^T = P^T o (dP^T o Z^T - D) of a thread's elements (probabilities_t's P^T, dP^T; sD
// holding D from the thread's first column), rounded in pairs into A-fragment registers; MASKED: dS^T = 0
// where P^T is -0.
// SOFTCAP: dS^T times probabilities_t's 1 - tanh^2 (cg). MASK_GRAD: dS^T stored into `mg` (MaskGrad).
template <int QT, bool MASKED>
__device__ __forceinline__ void gradients_t(const float (&p)[QT * 4], const float (&dp)[QT * 4], const float* sD, int t,
                                            const DropScale& z, const u32 (&cg)[QT * 2], const MaskGrad& mg,
                                            u32 (&pt)[QT * 2], u32 (&dst)[QT * 2]) {
#pragma unroll
    for (int nt = 0; nt < QT; ++nt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int x = nt * 4 + 2 * r, col = nt * 8 + 2 * t;
            float ds[2];
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                ds[c] = p[x + c] * (z(dp[x + c], x + c) - sD[col + c]);
                if (MASK_GRAD && nt * 8 + c < mg.rows && 8 * r < mg.keys)
                    mg.row[(nt * 8 + c) * mg.S + 8 * r] =
                        MASKED && __float_as_uint(p[x + c]) == 0x80000000u ? 0.f : ds[c];
                if (SOFTCAP)
                    ds[c] *= __half2float(__ushort_as_half(static_cast<unsigned short>(c ? cg[x / 2] >> 16 : cg[x / 2])));
                if (MASKED && __float_as_uint(p[x + c]) == 0x80000000u) ds[c] = 0.f;
            }
            pt[nt * 2 + r] = pack2<IS_BF16>(z(p[x], x), z(p[x + 1], x + 1));
            dst[nt * 2 + r] = pack2<IS_BF16>(ds[0], ds[1]);
        }
}

// P^T (from S^T, issued first) and dS^T (dP^T, issued after it) of a thread's elements, as pt and dst: P^T
// while dP^T is still running, masked unless the tile is full and there is no attn_mask (a branch per
// tile, uniform over the CTA). `mask`: the attn_mask's (batch, query head) slice (ATTN_MASK), whose bits
// (mask_bits) are gathered while S^T runs, unless the step is `dense` (StepWalk::dense: a bool mask attends
// every visible pair of it).
template <int QT>
__device__ __forceinline__ void gradients_of_step(float (&s)[QT * 4], float (&dp)[QT * 4], bool full, bool dense,
                                                  const Visibility<int>& vis, int j, int c0, int t, const float* sLse,
                                                  const float* sD, float scale_log2, const DropScale& z,
                                                  const mask_t* mask, long long m_sm, const Modifiers& mod,
                                                  const MaskGrad& mg, u32 (&pt)[QT * 2], u32 (&dst)[QT * 2]) {
    full = full && !ATTN_MASK;  // (ALiBi needs no selects: its p is computed the same either way)
    unsigned long long attend = ~0ull;
    if constexpr (ATTN_MASK == 1) attend = mask_bits<QT>(mask, m_sm, vis.L, vis.S, j, c0, t, !dense);
    wgmma_wait<1>();
    fence_regs(s);
    // a float mask's elements after S^T (not gathered under it as the bits are: a register each, which at
    // E = 128 left too few for the products), while dP^T still runs
    mask_reg_t mv[QT * 4 / MASK_PACK / MASK_PARTS];
    u32 cg[QT * 2];  // SOFTCAP's 1 - tanh^2
    if constexpr (MASK_PARTS == 1) {
        if constexpr (FLOAT_MASK) mask_values<QT, 0, 1>(mask, m_sm, vis.L, vis.S, j, c0, t, mv);
        if (full) probabilities_t<QT, false>(s, vis, j, c0, t, sLse, scale_log2, attend, mv, mod, cg);
        else probabilities_t<QT, true>(s, vis, j, c0, t, sLse, scale_log2, attend, mv, mod, cg);
    } else {  // a float32 mask, half its elements at a time; the second half loaded after the first is used
        mask_values<QT, 0, 2>(mask, m_sm, vis.L, vis.S, j, c0, t, mv);
        probabilities_t<QT, true, 0, 2>(s, vis, j, c0, t, sLse, scale_log2, attend, mv, mod, cg);
        asm volatile("" ::: "memory");
        mask_values<QT, 1, 2>(mask, m_sm, vis.L, vis.S, j, c0, t, mv);
        probabilities_t<QT, true, 1, 2>(s, vis, j, c0, t, sLse, scale_log2, attend, mv, mod, cg);
    }
    wgmma_wait<0>();
    fence_regs(dp);
    if (full) gradients_t<QT, false>(s, dp, sD, t, z, cg, mg, pt, dst);
    else gradients_t<QT, true>(s, dp, sD, t, z, cg, mg, pt, dst);
}

// Zero a thread's rows (row, row + 8) of a 64 x N accumulator piece where they see no key: outside [lo, hi)
// or, with an attn_mask, where their lse is -inf (`row_lse`: the stage's lse of row `row`, 8 on that of
// row + 8). The dQ rows that see no key add zeros (their dS is 0, but K may hold inf, and 0 * inf is NaN).
template <int N>
__device__ __forceinline__ void zero_unseen_rows(float (&acc)[N / 2], int row, int lo, int hi, const float* row_lse) {
    bool none[2];
#pragma unroll
    for (int r = 0; r < 2; ++r)
        none[r] = row + 8 * r < lo || row + 8 * r >= hi || (ATTN_MASK && row_lse[8 * r] == -CUSDPA_INF);
    if (!__any_sync(0xffffffffu, none[0] || none[1])) return;  // the common case: a vote, not N / 2 selects
#pragma unroll
    for (int r = 0; r < 2; ++r)
        if (none[r])
#pragma unroll
            for (int nt = 0; nt < N / 8; ++nt) acc[nt * 4 + 2 * r] = acc[nt * 4 + 2 * r + 1] = 0.f;
}

// Deterministic mode: spin until `count` (acquired) says `before` key blocks have added theirs.
__device__ __forceinline__ void wait_for_count(const int* count, int before) {
    int seen;
    do {
        asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(seen) : "l"(count) : "memory");
    } while (seen != before);
}

// Deterministic mode: move the count on with release semantics, after the global writes of this thread
// and of the threads that passed a barrier with it before (a release is cumulative).
__device__ __forceinline__ void release_count(int* count) {
    asm volatile("red.release.gpu.global.add.s32 [%0], 1;\n" ::"l"(count) : "memory");
}

// acc += A B^T over D columns: 64 rows of A (from a tile of A_ROWS rows) against N rows of B (from a tile of
// B_ROWS rows, all of them by default), both K-major in the SW-byte swizzle (issued, not waited for).
template <int D, int A_ROWS, int B_ROWS, int SW, int N = B_ROWS>
__device__ __forceinline__ void issue_abt(float (&acc)[N / 2], const unsigned char* sA, const unsigned char* sB) {
    const unsigned long long da = sw_desc<SW>(sA, 16), db = sw_desc<SW>(sB, 16);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        const int chunk = kk / (SW / 32), inner = (kk % (SW / 32)) * 32;
        wgmma_ss(acc, desc_plus(da, chunk * A_ROWS * SW + inner), desc_plus(db, chunk * B_ROWS * SW + inner), kk > 0);
    }
}

// The first products of a step, S^T = K Q^T (over E) and dP^T = V dO^T (over Ev), for N of its BLOCK_M
// queries (the tiles `sQ`, `sdO` point at), each its own commit group (gradients_of_step waits for them);
// the dK and dV accumulators are fenced first, since the last step's wgmmas wrote them.
template <int BLOCK_N, int BLOCK_M, int QK_SW, int V_SW, int N, int DK, int DV>
__device__ __forceinline__ void issue_s_dp(float (&s)[N / 2], float (&dp)[N / 2], float (&dk_acc)[DK],
                                           float (&dv_acc)[DV], const unsigned char* sK, const unsigned char* sQ,
                                           const unsigned char* sV, const unsigned char* sdO) {
    fence_regs(dk_acc);
    fence_regs(dv_acc);
    wgmma_fence();
    issue_abt<HEAD_DIM, BLOCK_N, BLOCK_M, QK_SW, N>(s, sK, sQ);
    wgmma_commit();
    issue_abt<HEAD_DIM_V, BLOCK_N, BLOCK_M, V_SW, N>(dp, sV, sdO);
    wgmma_commit();
}

// acc += X B for X (64 rows x K_ROWS) in A-fragment registers and B (K_ROWS rows x D columns, SW-byte
// swizzle) read transposed from shared memory (issued, not waited for).
template <int D, int K_ROWS, int SW>
__device__ __forceinline__ void issue_xtb(float (&acc)[D / 2], const u32 (&x)[K_ROWS / 4], const unsigned char* sB) {
    const unsigned long long db = sw_desc<SW>(sB, K_ROWS * SW);
#pragma unroll
    for (int kk = 0; kk < K_ROWS / 16; ++kk) {
        const u32 a[4] = {x[4 * kk], x[4 * kk + 1], x[4 * kk + 2], x[4 * kk + 3]};
        wgmma_rs(acc, a, desc_plus(db, kk * 16 * SW));
    }
}

// Zero the rows r with zero(r) of a ROWS x D tile in the SW-byte swizzle (whole rows: the swizzle only
// permutes 16-byte pieces within a row of a column chunk), by the 32 lanes of a warp.
template <int ROWS, int D, int SW, class Pred>
__device__ __forceinline__ void zero_rows_where(unsigned char* tile, int lane, const Pred& zero) {
    constexpr int PIECES = D * 2 / 16, CHUNK = SW / 16;  // 16-byte pieces of a row: all, and per column chunk
    for (int x = lane; x < ROWS * PIECES; x += 32) {
        const int r = x / PIECES, c = (x % PIECES) / CHUNK, ch = x % CHUNK;
        if (zero(r)) *reinterpret_cast<uint4*>(tile + c * ROWS * SW + r * SW + ch * 16) = make_uint4(0, 0, 0, 0);
    }
}

// A warp's share of P^T or dS^T (its 16 key rows from kr: this thread's are kr + g and kr + g + 8; its
// QT n8 tiles of queries from tile nt0) into a key-major shared tile in the 128-byte swizzle, which the
// products read as a K-major or (transposed) MN-major operand: rows of 128 bytes (64 queries) per key,
// chunks of `keys` rows per 64 queries, 16-byte pieces swizzled by the key row (conflict-free: the 8 rows
// g of a store land on 8 different pieces).
template <int QT>
__device__ __forceinline__ void store_ds_t(unsigned char* sdS, int keys, const u32 (&dst)[QT * 2], int kr, int lane,
                                           int nt0 = 0) {
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int x = 0; x < QT; ++x)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int nt = nt0 + x;
            *reinterpret_cast<u32*>(sdS + (nt / 8) * keys * 128 + (kr + g + 8 * r) * 128 + (((nt % 8) ^ g) * 16) +
                                    4 * t) = dst[x * 2 + r];
        }
}

// acc += dS B over the step's keys: dS (64 queries x BLOCK_N keys) read transposed from the key-major
// chunk of its queries, B (BLOCK_N keys x N columns) read transposed from K's column chunks (SW-byte
// swizzle) from the one `sK` points at (issued, not waited for).
template <int KEYS, int SW, int N>
__device__ __forceinline__ void issue_ds_k(float (&acc)[N / 2], const unsigned char* sdS, const unsigned char* sK) {
    const unsigned long long da = sw_desc<128>(sdS, KEYS * 128), db = sw_desc<SW>(sK, KEYS * SW);
#pragma unroll
    for (int kk = 0; kk < KEYS / 16; ++kk)
        wgmma_ss<1, 1>(acc, desc_plus(da, kk * 16 * 128), desc_plus(db, kk * 16 * SW), kk > 0);
}

// The (query head, query block) of step `it` of a CTA: the heads of its GQA group in turn, each over the
// query blocks [m_begin, m_begin + m_blocks) that see its keys, from block m_begin + rot (rotated) on.
struct StepOrder {
    int h0, m_begin, m_blocks, rot;
    __device__ __forceinline__ void at(int it, int& h, int& mb) const {
        h = h0 + it / m_blocks;
        const int k = it % m_blocks + rot;
        mb = m_begin + (k >= m_blocks ? k - m_blocks : k);
    }
};

// Deterministic mode: how many key blocks of n's class (n' = n mod `copies`: those that add into the same
// copy of the accumulator) add into query block mb before key block n does (the order flash_bwd_sm90.cu
// describes). Banded: the key blocks above n that see mb. Rotated (every pair visible, n_blocks <=
// m_blocks): key block n' reaches mb after (mb - n') mod m_blocks steps, so those that reach it before n
// does are n' in (n, mb] where n <= mb, else [0, mb] and (n, n_blocks).
template <int BLOCK_N, int BLOCK_M>
__device__ __forceinline__ int blocks_before(const Visibility<int>& vis, int n, int mb, int n_blocks, bool rotated,
                                             int copies) {
    if (!rotated) {
        int j_first, j_end;
        vis.key_range(mb * BLOCK_M, min(mb * BLOCK_M + BLOCK_M, vis.L), j_first, j_end);
        return ((j_end - 1) / BLOCK_N - n) / copies;
    }
    const int top = min(mb, n_blocks - 1);
    if (n <= mb) return (top - n) / copies;
    return (top - n % copies + copies) / copies + (n_blocks - 1 - n) / copies;
}

// The parameters of both Hopper backward kernels, which the host passes alike.
#define BWD90_KERNEL_PARAMS                                                                                          \
    const __grid_constant__ TmaMap tm_q, const __grid_constant__ TmaMap tm_k, const __grid_constant__ TmaMap tm_v,    \
        const __grid_constant__ TmaMap tm_do, const float *__restrict__ lse, const float *__restrict__ delta,        \
        elem_t *__restrict__ dk, elem_t *__restrict__ dv, float *__restrict__ dq_accum, long long sem_offset,        \
        int rotate, int descending, const int *__restrict__ cu_q, const int *__restrict__ cu_k, int L, int S,        \
        int Hq, int group, int q_hm, int q_bm, int k_hm, int k_bm, int v_hm, int v_bm, int do_hm, int do_bm,         \
        long long dk_sb, long long dk_sh, long long dk_sm, long long dv_sb, long long dv_sh, long long dv_sm,        \
        long long acc_copy, long long acc_sb, long long acc_sh, long long lse_sb, long long lse_sh, float scale,     \
        float scale_log2, int left, int right, int lower_right, unsigned int seed_lo, unsigned int seed_hi,          \
        unsigned int offset, unsigned int threshold, float rp_dropout, const mask_t *__restrict__ mask,              \
        long long m_sb, long long m_sh, long long m_sm, const unsigned char *__restrict__ seen, long long sk_b,      \
        long long sk_h, const signed char *__restrict__ blocks, long long bs_b, long long bs_h, long long bs_m,      \
        int sum_bm, int sum_bn, const float *__restrict__ slopes, long long slopes_b, float softcap,             \
        float *__restrict__ dmask

// A Hopper backward CTA's place: its key block n of its (batch, kv head) slice (`descending`: blockIdx.x = 0
// takes the last), the rows and keys that matter, and the
// order of its steps (rotated where every query sees every key and the key blocks are no more than the
// query blocks, if `rotate`).
struct Bwd90Cta {
    int n, n0, n_blocks, m_blocks, steps;
    int qi_lo, qi_hi;  // query rows that see any key
    int kj_lo, kj_hi;  // keys some query row sees
    bool rotated;
    StepOrder order;

    // The common start of both kernels: the CTA's place, then (thread 0) the mbarriers initialised and the
    // CTA synchronised. false: the block holds no key of the slice, and every thread returns.
    template <int BLOCK_N, int BLOCK_M, int STAGES>
    __device__ __forceinline__ bool start(const Slice& slice, int group, bool descending, int rotate,
                                          unsigned long long* bars, int consumer_threads);

    template <int BLOCK_N, int BLOCK_M>
    __device__ __forceinline__ bool place(const Slice& slice, int group, bool descending, int rotate) {
        const Visibility<int>& vis = slice.vis;
        n_blocks = (slice.S + BLOCK_N - 1) / BLOCK_N;
        n = descending ? n_blocks - 1 - static_cast<int>(blockIdx.x) : static_cast<int>(blockIdx.x);
        n0 = n * BLOCK_N;
        if (n < 0 || n0 >= slice.S) return false;
        int i_lo, i_hi;
        vis.query_range(n0, min(n0 + BLOCK_N, slice.S), i_lo, i_hi);  // query rows that see a key of the block
        vis.query_range(0, slice.S, qi_lo, qi_hi);
        vis.key_range(0, slice.L, kj_lo, kj_hi);
        const int m_begin = i_lo / BLOCK_M;
        m_blocks = i_lo < i_hi ? (i_hi + BLOCK_M - 1) / BLOCK_M - m_begin : 0;
        steps = slice.L > 0 ? group * m_blocks : 0;
        rotated = rotate && vis.left < 0 && vis.right < 0 && n_blocks <= m_blocks;
        order = StepOrder{slice.h, m_begin, m_blocks, rotated ? n : 0};
        return true;
    }
};

// The steps a CTA takes, in order, as each warp walks them: every one of its `steps` or, given the forward's
// block summary of an attn_mask (`blocks`: per (batch, head, query block of sum_bm rows, key block of sum_bn
// keys) 0 where no pair is attended, with its (b, h, query block) strides; kernels_cuda/mask_summary.cu),
// those whose query block the mask lets see some key of the CTA's block: a step the mask hides wholly adds
// nothing to dK, dV or dQ. A warp reads 32 steps' bytes at a time, a lane a step, and keeps which it takes
// as a ballot (BallotWalk, as the forward's KeyBlocks does), so producer, dQ writer and consumers skip the
// same steps. The lane also keeps whether the step is dense (every block byte 2: a bool mask attends every
// visible pair), which the consumers take by shuffle and then read none of the mask: the 90%-empty mask's
// backward waited on those byte loads at 11% of its samples (ncu), for blocks the summary showed fully attended.
// Not in deterministic mode, whose dQ order counts a turn of every key block. Every lane calls `from`.
template <int BLOCK_N, int BLOCK_M>
struct StepWalk {
    const signed char* row;  // the summary at (batch, head 0, query block 0, the CTA's first key block); null: every step
    long long bs_h, bs_m;
    int sum_bm, key_blocks, rows, steps;  // key_blocks: summary key blocks the CTA's keys overlap
    StepOrder order;
    BallotWalk walk;  // over the steps taken
    bool lane_dense = false;  // whether step walk.chunk + lane is dense (evaluated by `takes`)

    __device__ __forceinline__ StepWalk(const Bwd90Cta& cta, const Slice& slice, const signed char* blocks,
                                        long long bs_b, long long bs_h_, long long bs_m_, int sum_bm_, int sum_bn,
                                        bool ordered)
        : row(nullptr), bs_h(bs_h_), bs_m(bs_m_), sum_bm(sum_bm_), key_blocks(0), rows(slice.L), steps(cta.steps),
          order(cta.order) {
        if (!ATTN_MASK || blocks == nullptr || ordered || cta.steps == 0) return;
        const int first = cta.n0 / sum_bn, last = (min(cta.n0 + BLOCK_N, slice.S) - 1) / sum_bn;
        row = blocks + slice.b * bs_b + first;
        key_blocks = last - first + 1;
    }
    // the first step to take at or after `it` (steps: none)
    __device__ __forceinline__ int from(int it) {
        if (row == nullptr) return it;
        return walk.from(it, steps, [&](int m) { return m < steps && takes(m); });
    }
    // whether step `it`, a step `from` returned last, reads no mask (every lane calls it)
    __device__ __forceinline__ bool dense(int it) const {
        return row != nullptr && __shfl_sync(0xffffffffu, static_cast<int>(lane_dense), it & 31) != 0;
    }

  private:
    // whether the summary shows step `it` some attended pair: its query blocks that the step's rows fall in
    // (one where the mask's rows broadcast) against the key blocks the CTA's keys overlap
    __device__ __forceinline__ bool takes(int it) {
        int h, mb;
        order.at(it, h, mb);
        const int m0 = mb * BLOCK_M, r_first = m0 / sum_bm;
        const int r_last = bs_m != 0 ? (min(m0 + BLOCK_M, rows) - 1) / sum_bm : r_first;
        bool take = false, all = true;
        for (int r = r_first; r <= r_last; ++r)
            for (int x = 0; x < key_blocks; ++x) {
                const int b = row[h * bs_h + r * bs_m + x] & 3;
                take |= b != 0;
                all &= b == 2;
            }
        lane_dense = all;
        return take;
    }
};

// The mbarriers (init_barriers' layout): K/V full, the producer's own "staged" (tiles it zeroes rows of
// before releasing them), then per stage Q/dO full, empty (one arrival per consumer thread, each after its own
// reads of the stage: racecheck orders reads by their own thread's arrival only) and lse/D full
// (one arrival per producer lane, each after its own stores).
template <int STAGES>
__device__ __forceinline__ void init_barriers(unsigned long long* bars, int consumer_threads) {
    mbar_init(bars, 1);
    mbar_init(bars + 1, 1);
    for (int st = 0; st < STAGES; ++st) {
        mbar_init(bars + 2 + st, 1);
        mbar_init(bars + 2 + STAGES + st, consumer_threads);
        mbar_init(bars + 2 + 2 * STAGES + st, 32);
    }
    mbar_init_fence();
}

template <int BLOCK_N, int BLOCK_M, int STAGES>
__device__ __forceinline__ bool Bwd90Cta::start(const Slice& slice, int group, bool descending, int rotate,
                                                unsigned long long* bars, int consumer_threads) {
    if (!place<BLOCK_N, BLOCK_M>(slice, group, descending, rotate)) return false;
    if (threadIdx.x == 0) init_barriers<STAGES>(bars, consumer_threads);
    __syncthreads();
    return true;
}

// With an attn_mask, a key block that the mask hides from every query row of the group's heads adds nothing
// anywhere (dK = dV = 0, no dQ term): its CTA takes no steps, unless deterministic mode (`ordered`) counts
// every key block's dQ turn. Every warp votes alike (the same bytes), so the CTA agrees without a barrier.
template <int BLOCK_N>
__device__ __forceinline__ void skip_unseen_block(Bwd90Cta& cta, const Slice& slice, int group,
                                                  const unsigned char* seen, long long sk_b, long long sk_h,
                                                  bool ordered) {
    if (!ATTN_MASK || ordered) return;
    const UnseenKeys unseen{seen + slice.b * sk_b + slice.kvh * group * sk_h, sk_h, sk_h ? group : 1, slice.S};
    if (unseen.all(cta.n0, BLOCK_N, threadIdx.x % 32)) cta.steps = 0;
}

// The shared-memory tiles and barriers a Hopper backward CTA's producer fills and signals.
struct Bwd90Smem {
    unsigned char *sK, *sV, *sQ, *sdO;  // K, V; STAGES Q and dO tiles, each in column chunks of its swizzle
    float *sLse, *sD;                    // [STAGES][BLOCK_M]: lse (log2 domain; natural with a float mask), D
    unsigned long long* bars;            // init_barriers' layout
};

// The shared memory of both kernels: K, V, the STAGES Q and dO tiles, then EXTRA bytes of the kernel's own
// (at `extra`), lse and D per stage, the mbarriers (init_barriers' layout). Every size is a multiple of 1024,
// so each tile keeps its swizzle's alignment.
template <int BLOCK_N, int BLOCK_M, int STAGES, int EXTRA>
__device__ __forceinline__ Bwd90Smem carve_smem(unsigned char* smem, unsigned char*& extra) {
    Bwd90Smem sm;
    sm.sK = smem;
    sm.sV = sm.sK + BLOCK_N * HEAD_DIM * 2;
    sm.sQ = sm.sV + BLOCK_N * HEAD_DIM_V * 2;
    sm.sdO = sm.sQ + STAGES * BLOCK_M * HEAD_DIM * 2;
    extra = sm.sdO + STAGES * BLOCK_M * HEAD_DIM_V * 2;
    sm.sLse = reinterpret_cast<float*>(extra + EXTRA);
    sm.sD = sm.sLse + STAGES * BLOCK_M;
    sm.bars = reinterpret_cast<unsigned long long*>(sm.sD + STAGES * BLOCK_M);
    return sm;
}

// The producer warp: K and V of the CTA's BLOCK_N keys once, then per step `walk` takes the Q and dO tiles of
// the step's (head, query block) with its lse and D, into STAGES buffers. dQ sums over keys, so K rows that no query
// of the slice sees are zeroed; dV and dK sum over queries, so Q and dO rows that see no key are zeroed
// (and, in a packed batch, the next sequence's rows): the producer zeroes them (barrier `staged`) before
// it releases the tile.
template <int BLOCK_N, int BLOCK_M, int STAGES, int QK_SW, int V_SW>
__device__ __forceinline__ void produce(const Bwd90Smem& sm, const Slice& slice, const Bwd90Cta& cta,
                                        StepWalk<BLOCK_N, BLOCK_M> walk,
                                        const TmaMap& tm_q, const TmaMap& tm_k, const TmaMap& tm_v,
                                        const TmaMap& tm_do, int q_hm, int q_bm, int k_hm, int k_bm, int v_hm, int v_bm,
                                        int do_hm, int do_bm, const float* __restrict__ lse,
                                        const float* __restrict__ delta, long long lse_sb, long long lse_sh,
                                        const unsigned char* __restrict__ seen, long long sk_b, long long sk_h,
                                        int group, int lane) {
    unsigned long long *kv_full = sm.bars, *staged = sm.bars + 1, *q_full = sm.bars + 2, *q_empty = q_full + STAGES,
                       *stats_full = q_empty + STAGES;
    const int n0 = cta.n0, steps = cta.steps, qi_lo = cta.qi_lo, qi_hi = cta.qi_hi, kj_lo = cta.kj_lo,
              kj_hi = cta.kj_hi;
    u32 staged_phase = 0;
    const int krow = slice.start_k + n0;
    // dQ sums over keys: K rows that no query sees (and, packed, the next sequence's; with an attn_mask, the
    // keys it lets no row of the group's query heads see) are zeroed first.
    const int k_end = slice.packed ? n0 + BLOCK_N : min(n0 + BLOCK_N, slice.S);
    const UnseenKeys unseen{ATTN_MASK ? seen + slice.b * sk_b + slice.kvh * group * sk_h : nullptr, sk_h,
                            sk_h ? group : 1, slice.S};
    const bool k_unseen = unseen.any(n0, BLOCK_N, lane);
    const bool k_dirty = n0 < kj_lo || k_end > kj_hi || k_unseen;
    unsigned long long* kbar = k_dirty ? staged : kv_full;
    if (lane == 0) {
        mbar_expect_tx(kbar, BLOCK_N * (HEAD_DIM + HEAD_DIM_V) * 2);
#pragma unroll
        for (int c = 0; c < HEAD_DIM / (QK_SW / 2); ++c)
            tma_load(sm.sK + c * BLOCK_N * QK_SW, tm_k, kbar, QK_SW / 2 * c, krow, slice.kvh * k_hm, slice.b * k_bm);
#pragma unroll
        for (int c = 0; c < HEAD_DIM_V / (V_SW / 2); ++c)
            tma_load(sm.sV + c * BLOCK_N * V_SW, tm_v, kbar, V_SW / 2 * c, krow, slice.kvh * v_hm, slice.b * v_bm);
    }
    if (k_dirty) {
        mbar_wait(staged, staged_phase);
        staged_phase ^= 1;
        const int lo_rows = max(0, min(kj_lo - n0, BLOCK_N)), hi_row = max(lo_rows, min(kj_hi - n0, BLOCK_N));
        zero_rows_where<BLOCK_N, HEAD_DIM, QK_SW>(sm.sK, lane, [&](int r) { return r < lo_rows || r >= hi_row || (k_unseen && n0 + r < slice.S && unseen.at(n0 + r)); });
        fence_proxy_async();
        __syncwarp();
        if (lane == 0) mbar_arrive(kv_full);
    }

    for (int it = walk.from(0), k = 0; it < steps; it = walk.from(it + 1), ++k) {  // k: the steps taken
        const int st = k % STAGES;
        const u32 phase = (k / STAGES) & 1;
        int h, mb;
        cta.order.at(it, h, mb);
        const int m0 = mb * BLOCK_M;
        mbar_wait(q_empty + st, phase ^ 1);
        // Q and dO rows that see no key (and, packed, the next sequence's rows) are zeroed: rows outside the
        // visibility rule's range and, with an attn_mask, rows whose lse is -inf (the mask hides every key).
        const int q_end = slice.packed ? m0 + BLOCK_M : min(m0 + BLOCK_M, slice.L);
        unsigned char* sQs = sm.sQ + st * BLOCK_M * HEAD_DIM * 2;
        unsigned char* sdOs = sm.sdO + st * BLOCK_M * HEAD_DIM_V * 2;
        const int qrow = slice.start_q + m0;
        const long long lo = slice.stats_offset(lse_sb, lse_sh, h);
        float* sLse = sm.sLse + st * BLOCK_M;
        bool empty_row = false;
        if (ATTN_MASK) {  // lse first: it decides whether the stage is dirty
            for (int r = lane; r < BLOCK_M; r += 32) {
                const int row = m0 + r;
                const bool in = row >= qi_lo && row < qi_hi;
                sLse[r] = in ? (NATURAL ? lse[lo + row] : __fmul_rn(lse[lo + row], LOG2E)) : 0.f;
                empty_row |= sLse[r] == -CUSDPA_INF;
            }
            empty_row = __any_sync(0xffffffffu, empty_row);
        }
        const bool dirty = m0 < qi_lo || q_end > qi_hi || empty_row;
        // The tiles first (a dirty stage's complete on `staged`), then lse and D (plain loads, whose latency
        // the copies hide), released on their own barrier by each lane after its stores: the consumers'
        // reads are then ordered after the stores lane by lane, whichever of the copies and the stores ends
        // last (on the tiles' barrier, where lane 0 arrived for all, compute-sanitizer's racecheck reported
        // the stores as racing with the consumers' reads).
        if (lane == 0) {
            constexpr u32 bytes = BLOCK_M * (HEAD_DIM + HEAD_DIM_V) * 2;
            unsigned long long* bar = dirty ? staged : q_full + st;
            mbar_expect_tx(bar, bytes);
#pragma unroll
            for (int c = 0; c < HEAD_DIM / (QK_SW / 2); ++c)
                tma_load(sQs + c * BLOCK_M * QK_SW, tm_q, bar, QK_SW / 2 * c, qrow, h * q_hm, slice.b * q_bm);
#pragma unroll
            for (int c = 0; c < HEAD_DIM_V / (V_SW / 2); ++c)
                tma_load(sdOs + c * BLOCK_M * V_SW, tm_do, bar, V_SW / 2 * c, qrow, h * do_hm, slice.b * do_bm);
        }
        for (int r = lane; r < BLOCK_M; r += 32) {
            const int row = m0 + r;
            const bool in = row >= qi_lo && row < qi_hi;
            if (!ATTN_MASK) sLse[r] = in ? (NATURAL ? lse[lo + row] : __fmul_rn(lse[lo + row], LOG2E)) : 0.f;
            sm.sD[st * BLOCK_M + r] = in ? delta[lo + row] : 0.f;
        }
        mbar_arrive(stats_full + st);
        if (!dirty) continue;
        __syncwarp();  // the lanes' lse stores before the rows they pick
        mbar_wait(staged, staged_phase);
        staged_phase ^= 1;
        const int lo_rows = max(0, min(qi_lo - m0, BLOCK_M)), hi_row = max(lo_rows, min(qi_hi - m0, BLOCK_M));
        const auto unseen_row = [&](int r) { return r < lo_rows || r >= hi_row || (ATTN_MASK && sLse[r] == -CUSDPA_INF); };
        zero_rows_where<BLOCK_M, HEAD_DIM, QK_SW>(sQs, lane, unseen_row);
        zero_rows_where<BLOCK_M, HEAD_DIM_V, V_SW>(sdOs, lane, unseen_row);
        fence_proxy_async();
        __syncwarp();
        if (lane == 0) mbar_arrive(q_full + st);
    }
}

// A warp's 16 rows of an accumulator (N / 4 n8 tiles), scaled and rounded, rows >= `rows` skipped.
template <int N>
__device__ __forceinline__ void store_rows(elem_t* base, long long pitch, const float (&acc)[N], float scale,
                                           int row0, int rows, int lane) {
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = row0 + g + 8 * r;
        if (row >= rows) continue;
#pragma unroll
        for (int nt = 0; nt < N / 4; ++nt)
            *reinterpret_cast<u32*>(base + row * pitch + nt * 8 + 2 * t) =
                pack2<IS_BF16>(acc[nt * 4 + 2 * r] * scale, acc[nt * 4 + 2 * r + 1] * scale);
    }
}


// The epilogue of flash_bwd_sm90: a warp's 16 rows (row0 on) of its dK or dV accumulator (D / 8 n8 tiles), scaled and
// rounded into `stage` (the block's rows of D elements, its 16-byte chunks XOR-swizzled by the row, so the 8
// rows x 4 column pairs of one store instruction fall in different banks), for copy_rows_out. Written
// straight from the fragments, a store instruction covered 16 bytes of each of 8 rows: half of every 32-byte
// sector, 64 store instructions a thread per block (ncu: lg throttle at the end of every CTA).
template <int D>
__device__ __forceinline__ int swizzled_chunk(int row, int chunk) {
    constexpr int CHUNKS = D / 8, SW = CHUNKS % 8 == 0 ? 8 : CHUNKS % 4 == 0 ? 4 : CHUNKS % 2 == 0 ? 2 : 1;
    return chunk ^ (row % SW);
}

template <int D, int N>
__device__ __forceinline__ void stage_rows(unsigned char* stage, const float (&acc)[N], float scale, int row0,
                                           int lane) {
    static_assert(N == D / 2, "one n8 tile per 16-byte chunk of a row");
    // the swizzled addresses depend on the lane: made opaque here, lest the compiler hoist the 2 D / 8 of them
    // above the step loop, where they take registers the loop needs (ptxas: a float32 mask at E = 128 spills
    // 3 pairs in the consumers without it, 1 with it)
    asm volatile("" : "+r"(lane));
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = row0 + g + 8 * r;
#pragma unroll
        for (int nt = 0; nt < D / 8; ++nt)
            *reinterpret_cast<u32*>(stage + row * D * 2 + swizzled_chunk<D>(row, nt) * 16 + t * 4) =
                pack2<IS_BF16>(acc[nt * 4 + 2 * r] * scale, acc[nt * 4 + 2 * r + 1] * scale);
    }
}

// The first `rows` of the ROWS rows that stage_rows staged, to rows of `pitch` elements at `base`, by THREADS
// threads (`tid` of them) in whole 16-byte segments (the host's dK and dV rows start on 16 bytes: `usable`).
template <int D, int ROWS, int THREADS>
__device__ __forceinline__ void copy_rows_out(elem_t* base, long long pitch, const unsigned char* stage, int rows,
                                              int tid) {
    constexpr int CHUNKS = D / 8;
    static_assert(ROWS * CHUNKS % THREADS == 0, "whole rounds of the threads");
#pragma unroll
    for (int i = 0; i < ROWS * CHUNKS / THREADS; ++i) {
        const int x = tid + i * THREADS, row = x / CHUNKS, chunk = x % CHUNKS;
        if (row >= rows) break;
        *reinterpret_cast<uint4*>(base + row * pitch + chunk * 8) =
            *reinterpret_cast<const uint4*>(stage + row * D * 2 + swizzled_chunk<D>(row, chunk) * 16);
    }
}

// The body of flash_bwd_dq_convert: dQ = scale * the fp32 accumulator (blocks of BLOCK_M query rows, a
// warpgroup's piece of 64 rows x DQ_N0 columns first, register k of thread x at float4 k * 128 + x, two
// columns of two rows 8 apart each; where acc_copy is not 0, copy 0 plus the copy acc_copy floats on, in
// that order), in the input dtype and q's layout: one CTA of CONVERT_THREADS per block (blockIdx.x, of
// (batch, head) blockIdx.y), rows >= L skipped. The block is rounded into shared memory first (rows padded
// by 16 bytes, so a warp's 8 rows x 4 column pairs hit 32 banks) and leaves it as whole 16-byte row
// segments: written straight from the fragment order, a warp's store covered 16 bytes of each of 8 rows,
// half of every 32-byte sector, and the pass ran at 2.1 TB/s (the 90%-empty mask's backward, H200).
constexpr int CONVERT_THREADS = 256;

template <int BLOCK_M, int DQ_N0>
__device__ __forceinline__ void dq_convert(const float* __restrict__ dq_accum, elem_t* __restrict__ dq,
                                           const int* __restrict__ cu_q, const int* __restrict__ cu_k, int L, int S,
                                           int Hq, long long acc_copy, long long acc_sb, long long acc_sh,
                                           long long dq_sb, long long dq_sh, long long dq_sm, float scale, int left,
                                           int right, int lower_right) {
    constexpr int DQ_BLOCK = BLOCK_M * HEAD_DIM, PIECE0 = 16 * DQ_N0;  // floats of a block, float4s of piece 0
    constexpr int PITCH = HEAD_DIM + 8;  // elements of a staged row
    __shared__ __align__(16) elem_t staged[BLOCK_M * PITCH];
    const Slice slice = Slice::per_query_head(Hq, 1, cu_q, cu_k, L, S, left, right, lower_right);
    const int m0 = blockIdx.x * BLOCK_M;
    if (m0 >= slice.L) return;
    const float4* acc = reinterpret_cast<const float4*>(
        dq_accum + slice.query_block(acc_sb, acc_sh, slice.h, BLOCK_M, blockIdx.x) * DQ_BLOCK);
    const int rows = min(BLOCK_M, slice.L - m0);
#pragma unroll 4
    for (int q4 = threadIdx.x; q4 < DQ_BLOCK / 4; q4 += CONVERT_THREADS) {
        const int w = q4 < PIECE0 ? 0 : 1, x4 = q4 - w * PIECE0, k = x4 / 128, x = x4 % 128;  // piece, register, thread
        const int row = (BLOCK_M == 128 ? 64 * w : 0) + x / 32 * 16 + x % 32 / 4;
        // rows past L: a piece the preprocess left as it was (no CTA of its rows), never zeroed (initcheck)
        if (row >= rows) continue;
        const int col = (BLOCK_M == 128 ? 0 : w * DQ_N0) + 8 * k + 2 * (x % 4);
        float4 a = acc[q4];
        if (acc_copy != 0) {
            const float4 b = acc[acc_copy / 4 + q4];
            a = make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
        }
        *reinterpret_cast<u32*>(staged + row * PITCH + col) = pack2<IS_BF16>(a.x * scale, a.y * scale);
        *reinterpret_cast<u32*>(staged + (row + 8) * PITCH + col) = pack2<IS_BF16>(a.z * scale, a.w * scale);
    }
    __syncthreads();
    elem_t* out = slice.query_rows(dq, dq_sb, dq_sh, dq_sm) + m0 * dq_sm;
    constexpr int SEGMENTS = HEAD_DIM / 8;  // 16-byte segments of a row (the host's dQ rows start on 16 bytes)
    for (int s = threadIdx.x; s < rows * SEGMENTS; s += CONVERT_THREADS) {
        const int row = s / SEGMENTS, col = s % SEGMENTS * 8;
        *reinterpret_cast<uint4*>(out + row * dq_sm + col) = *reinterpret_cast<const uint4*>(staged + row * PITCH + col);
    }
}
