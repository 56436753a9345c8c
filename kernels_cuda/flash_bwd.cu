// FLASH backward (FlashAttention-2 recomputation), in three deterministic kernels without atomics:
//   flash_bwd_preprocess  D_i = rowsum(dO_i * O_i) (0 for rows that see no key); zeroes the blocked fp32
//                         dQ accumulator of the Hopper backward (its copies, its semaphores) when given one
//   flash_bwd_dkdv        one CTA per block of keys of one kv head: loops over the query heads of its GQA
//                         group and their query blocks, so dK/dV are summed in registers in a fixed order
//   flash_bwd_dq          one CTA per block of queries: loops over key blocks, like the forward
// With P = exp2(S * scale_log2 - lse_log2) recomputed from the forward's logsumexp and Z = keep / (1 - p):
//   dV = (P o Z)^T dO,  dP = (dO V^T) o Z,  dS = P o (dP - D),  dQ = scale dS K,  dK = scale dS^T Q.
// S * scale_log2 and lse_log2 = lse * log2(e) are rounded alone, never fused into an fmaf, as the forward
// rounds its max: a row's single max then gets P = 1 exactly whenever lse_log2 comes back to the forward's
// log2-domain max (most values; else it is an ulp off, thousands on scores of ~1e12, which an fp32 lse
// cannot avoid). An fmaf would always be off by up to half an ulp of the product.
// No atomics means bit-identical gradients run to run, so deterministic mode costs nothing extra.
//
// Extra -D options: BWD_WARPS (dkdv: 16 keys per warp), BWD_BLOCK_M (dkdv: queries per step),
// DKDV_PART (3: dK and dV in one pass; 1: dV only; 2: dK only -- for E > 128, where both
// accumulators of a warp's 16 keys would not fit in registers, the host runs 1 then 2, recomputing S^T),
// DQ_WARPS, DQ_M_TILES, DQ_BLOCK_N.
#include "flash_common.cuh"

// ---------------------------------------------------------------------------------------------------
// D = rowsum(dO o O): one warp per row, 8 elements per lane.
constexpr int PRE_WARPS = 8;

extern "C" __global__ void __launch_bounds__(PRE_WARPS * 32)
flash_bwd_preprocess(const elem_t* __restrict__ o, const elem_t* __restrict__ dout, float* __restrict__ delta,
                     float* __restrict__ dq_accum, long long sem_offset, const int* __restrict__ cu_q,
                     const int* __restrict__ cu_k, int L, int S, int Hq, long long o_sb, long long o_sh,
                     long long o_sm, long long do_sb, long long do_sh, long long do_sm, long long acc_copy,
                     long long acc_sb, long long acc_sh, long long lse_sb, long long lse_sh, int left, int right,
                     int lower_right, int rows_per_cta) {
    const Slice slice = Slice::per_query_head(Hq, 1, cu_q, cu_k, L, S, left, right, lower_right);  // no kv head read
    int i_lo, i_hi;
    slice.vis.query_range(0, slice.S, i_lo, i_hi);
    if (slice.S == 0) i_hi = i_lo;
    const elem_t* ob = slice.query_rows(o, o_sb, o_sh, o_sm);
    const elem_t* dob = slice.query_rows(dout, do_sb, do_sh, do_sm);
    float* db = delta + slice.stats_offset(lse_sb, lse_sh);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int r0 = blockIdx.x * rows_per_cta, r_end = min(slice.L, r0 + rows_per_cta);
    for (int row = r0 + warp; row < r_end; row += PRE_WARPS) {
        float sum = 0.f;
        if (row >= i_lo && row < i_hi) {
            for (int e = lane * 8; e < HEAD_DIM_V; e += 256) {
                uint4 ov = *reinterpret_cast<const uint4*>(ob + row * o_sm + e);
                uint4 dv = *reinterpret_cast<const uint4*>(dob + row * do_sm + e);
                const elem_t* op = reinterpret_cast<const elem_t*>(&ov);
                const elem_t* dp = reinterpret_cast<const elem_t*>(&dv);
#pragma unroll
                for (int x = 0; x < 8; ++x) sum += elem_to_float(op[x]) * elem_to_float(dp[x]);
            }
        }
#pragma unroll
        for (int w = 16; w > 0; w /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, w);
        if (lane == 0) db[row] = sum;
    }
    if (dq_accum == nullptr || r0 >= slice.L) return;
    // The Hopper backward's accumulator block of these rows, blocked as flash_bwd_sm90.cu lays it out (in
    // each copy where acc_copy is not 0: flash_bwd_sm90_wide.cu's deterministic mode): the CTAs of its
    // BWD90_BLOCK_M / rows_per_cta row ranges zero one part each. A part whose rows all lie past L has no
    // CTA and stays as it was: the backward adds zeros there and flash_bwd_dq_convert never reads it.
    constexpr int DQ_BLOCK = BWD90_BLOCK_M * HEAD_DIM;
    const long long blk = slice.query_block(acc_sb, acc_sh, slice.h, BWD90_BLOCK_M, r0 / BWD90_BLOCK_M);
    const int part = DQ_BLOCK / (BWD90_BLOCK_M / rows_per_cta), copies = acc_copy != 0 ? 2 : 1;
    for (int c = 0; c < copies; ++c) {
        float4* acc = reinterpret_cast<float4*>(dq_accum + c * acc_copy + blk * DQ_BLOCK +
                                                (r0 % BWD90_BLOCK_M) / rows_per_cta * part);
        for (int x = threadIdx.x; x < part / 4; x += PRE_WARPS * 32) acc[x] = make_float4(0.f, 0.f, 0.f, 0.f);
        if (sem_offset >= 0 && r0 % BWD90_BLOCK_M == 0 && threadIdx.x == 0)  // the block's semaphore
            reinterpret_cast<int*>(dq_accum + sem_offset)[c * (acc_copy / DQ_BLOCK) + blk] = 0;
    }
}

// Store a 16-row x (8 * TILES)-column fp32 fragment block, scaled, as elem pairs; rows >= row_limit and
// columns >= cols are skipped, and the thread's row g (g + 8) is stored as zeros where bit 0 (1) of
// zero_rows is set.
template <int TILES>
__device__ __forceinline__ void store_frag_rows(elem_t* base, long long pitch, const float (&f)[TILES][4], float scale,
                                                int row0, int row_limit, int cols, int lane, u32 zero_rows = 0) {
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = row0 + g + 8 * r;
        if (row >= row_limit) continue;
        const bool zero = (zero_rows >> r) & 1u;
#pragma unroll
        for (int nt = 0; nt < TILES; ++nt) {
            const int col = nt * 8 + 2 * t;
            if (col < cols)
                *reinterpret_cast<u32*>(base + row * pitch + col) =
                    zero ? 0u : pack2<IS_BF16>(f[nt][2 * r] * scale, f[nt][2 * r + 1] * scale);
        }
    }
}

// ---------------------------------------------------------------------------------------------------
namespace dkdv {
constexpr int NUM_WARPS = BWD_WARPS;
constexpr int NTHREADS = NUM_WARPS * 32;
constexpr int BLOCK_N = NUM_WARPS * 16;  // keys per CTA, 16 per warp
constexpr int BLOCK_M = BWD_BLOCK_M;     // queries per step
constexpr int QT = BLOCK_M / 8;          // n8 tiles of S^T over queries
constexpr int PART = DKDV_PART;
constexpr bool WITH_DV = (PART & 1) != 0, WITH_DK = (PART & 2) != 0;
constexpr int ET = E_PAD / 8, EVT = EV_PAD / 8;  // a pass's unused accumulators are optimised away
constexpr int SQ_ELEMS = BLOCK_M * Q_PITCH, SDO_ELEMS = BLOCK_M * V_PITCH;
static_assert(BLOCK_M % 16 == 0 && QT <= 32, "BWD_BLOCK_M must be a multiple of 16 and at most 128");
}  // namespace dkdv

extern "C" __global__ void __launch_bounds__(dkdv::NTHREADS)
flash_bwd_dkdv(const elem_t* __restrict__ q, const elem_t* __restrict__ k, const elem_t* __restrict__ v,
               const elem_t* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
               elem_t* __restrict__ dk, elem_t* __restrict__ dv, const int* __restrict__ cu_q,
               const int* __restrict__ cu_k, int L, int S, int Hq, int group,
               long long q_sb, long long q_sh, long long q_sm, long long k_sb, long long k_sh, long long k_sm,
               long long v_sb, long long v_sh, long long v_sm, long long do_sb, long long do_sh, long long do_sm,
               long long dk_sb, long long dk_sh, long long dk_sm, long long dv_sb, long long dv_sh,
               long long dv_sm, long long lse_sb, long long lse_sh, float scale, float scale_log2, int left,
               int right, int lower_right, unsigned int seed_lo, unsigned int seed_hi, unsigned int offset,
               unsigned int threshold, float rp_dropout) {
    using namespace dkdv;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    elem_t* sK = reinterpret_cast<elem_t*>(smem_raw);  // [BLOCK_N][Q_PITCH]
    elem_t* sV = sK + BLOCK_N * Q_PITCH;                // [BLOCK_N][V_PITCH]
    elem_t* sQ = sV + BLOCK_N * V_PITCH;                // [2][BLOCK_M][Q_PITCH]
    elem_t* sdO = sQ + 2 * SQ_ELEMS;                    // [2][BLOCK_M][V_PITCH]
    float* sLse = reinterpret_cast<float*>(sdO + 2 * SDO_ELEMS);  // [2][BLOCK_M], log2 domain
    float* sD = sLse + 2 * BLOCK_M;                                // [2][BLOCK_M]

    const Slice slice = Slice::per_kv_head(Hq, group, cu_q, cu_k, L, S, left, right, lower_right);
    const int n0 = blockIdx.x * BLOCK_N;
    if (n0 >= slice.S) return;
    const Visibility<int>& vis = slice.vis;
    const elem_t* kb = slice.key_rows(k, k_sb, k_sh, k_sm);
    const elem_t* vb = slice.key_rows(v, v_sb, v_sh, v_sm);
    elem_t* dkb = slice.key_rows(dk, dk_sb, dk_sh, dk_sm);
    elem_t* dvb = slice.key_rows(dv, dv_sb, dv_sh, dv_sm);

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int krow0 = warp * 16;
    float dk_acc[1][ET][4], dv_acc[1][EVT][4];
#pragma unroll
    for (int x = 0; x < ET; ++x) dk_acc[0][x][0] = dk_acc[0][x][1] = dk_acc[0][x][2] = dk_acc[0][x][3] = 0.f;
#pragma unroll
    for (int x = 0; x < EVT; ++x) dv_acc[0][x][0] = dv_acc[0][x][1] = dv_acc[0][x][2] = dv_acc[0][x][3] = 0.f;

    const int n1 = min(n0 + BLOCK_N, slice.S);
    int i_lo, i_hi, jg_lo, jg_hi;
    vis.query_range(n0, n1, i_lo, i_hi);  // query rows that see a key of this block
    vis.key_range(0, slice.L, jg_lo, jg_hi);  // keys that any query sees
    const int m_begin = i_lo / BLOCK_M, m_blocks = i_lo < i_hi ? (i_hi + BLOCK_M - 1) / BLOCK_M - m_begin : 0;
    const int steps = slice.L > 0 ? group * m_blocks : 0;
    if (steps > 0) {
        // Keys no query may see are zero-filled: with P = 0 there, NaN in them would still poison dS.
        load_tile<BLOCK_N, HEAD_DIM, E_PAD, Q_PITCH, NTHREADS>(sK, kb, k_sm, n0, jg_lo, jg_hi);
        load_tile<BLOCK_N, HEAD_DIM_V, EV_PAD, V_PITCH, NTHREADS>(sV, vb, v_sm, n0, jg_lo, jg_hi);
    }
#if IS_DROPOUT
    const Dropout drop{seed_lo, seed_hi, offset, threshold};
#endif

    // Issue the loads of step `it` (query head slice.h + it / m_blocks, block it % m_blocks).
    auto issue = [&](int it, int buf) {
        const int h = slice.h + it / m_blocks, m0 = (m_begin + it % m_blocks) * BLOCK_M;
        const elem_t* qb = slice.query_rows(q, q_sb, q_sh, q_sm, h);
        const elem_t* dob = slice.query_rows(dout, do_sb, do_sh, do_sm, h);
        load_tile<BLOCK_M, HEAD_DIM, E_PAD, Q_PITCH, NTHREADS>(sQ + buf * SQ_ELEMS, qb, q_sm, m0, i_lo, i_hi);
        load_tile<BLOCK_M, HEAD_DIM_V, EV_PAD, V_PITCH, NTHREADS>(sdO + buf * SDO_ELEMS, dob, do_sm, m0, i_lo, i_hi);
        const long long lo = slice.stats_offset(lse_sb, lse_sh, h);
        for (int r = threadIdx.x; r < BLOCK_M; r += NTHREADS) {
            const int row = m0 + r;
            const bool in = row >= i_lo && row < i_hi;
            const float l = in ? lse[lo + row] : CUSDPA_INF;
            // lse = -inf marks a row that sees nothing: +inf makes its recomputed P exactly 0.
            sLse[buf * BLOCK_M + r] = l == -CUSDPA_INF ? CUSDPA_INF : __fmul_rn(l, LOG2E);
            sD[buf * BLOCK_M + r] = in ? delta[lo + row] : 0.f;
        }
    };
    if (steps > 0) issue(0, 0);
    cp_async_commit();

    for (int it = 0; it < steps; ++it) {
        const int buf = it & 1;
        const int m0 = (m_begin + it % m_blocks) * BLOCK_M;
        const u32 bh = slice.bh + it / m_blocks;  // of query head slice.h + it / m_blocks
        (void)bh;  // only the dropout keep test reads it
        cp_async_wait<0>();
        __syncthreads();  // step it's tiles landed; every warp is done with the other buffer
        if (it + 1 < steps) issue(it + 1, buf ^ 1);
        cp_async_commit();
        const elem_t* sQb = sQ + buf * SQ_ELEMS;
        const elem_t* sdOb = sdO + buf * SDO_ELEMS;
        const float* sLseb = sLse + buf * BLOCK_M;
        const float* sDb = sD + buf * BLOCK_M;

        // S^T = K Q^T for this warp's 16 keys x BLOCK_M queries
        float st[1][QT][4];
#pragma unroll
        for (int x = 0; x < QT; ++x) st[0][x][0] = st[0][x][1] = st[0][x][2] = st[0][x][3] = 0.f;
        mma_abt<1, BLOCK_M / 16, E_PAD / 16>(st, sK + krow0 * Q_PITCH, Q_PITCH, sQb, Q_PITCH, lane);
        // P^T, and the dropout keep bits of each element (bit 4 * nt + c)
        const bool full = vis.tile_full(m0, BLOCK_M, n0, BLOCK_N);
        u32 keep_bits[QT / 8 > 0 ? QT / 8 : 1];
#pragma unroll
        for (int x = 0; x < (QT / 8 > 0 ? QT / 8 : 1); ++x) keep_bits[x] = 0xffffffffu;
#pragma unroll
        for (int nt = 0; nt < QT; ++nt) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int j = n0 + krow0 + g + (c >= 2 ? 8 : 0);
                const int col = nt * 8 + 2 * t + (c & 1);
                const bool vis_ij = full || vis.visible(m0 + col, j);
                st[0][nt][c] = vis_ij ? exp2f(__fmul_rn(st[0][nt][c], scale_log2) - sLseb[col]) : 0.f;
#if IS_DROPOUT
                if (!drop.keep(bh, m0 + col, j)) keep_bits[nt / 8] &= ~(1u << ((nt % 8) * 4 + c));
#endif
            }
        }
        // Z = keep / (1 - p) applied element by element on the way into the tensor cores
        auto dropped = [&](float x, int nt, int c) {
            return ((keep_bits[nt / 8] >> ((nt % 8) * 4 + c)) & 1u) ? x * rp_dropout : 0.f;
        };
        // dV += (P o Z)^T dO
        if constexpr (WITH_DV) mma_pb<1, EV_PAD / 16, BLOCK_M / 16>(dv_acc, st, dropped, sdOb, V_PITCH, lane);
        if constexpr (WITH_DK) {
            // dP^T = V dO^T
            float dpt[1][QT][4];
#pragma unroll
            for (int x = 0; x < QT; ++x) dpt[0][x][0] = dpt[0][x][1] = dpt[0][x][2] = dpt[0][x][3] = 0.f;
            mma_abt<1, BLOCK_M / 16, EV_PAD / 16>(dpt, sV + krow0 * V_PITCH, V_PITCH, sdOb, V_PITCH, lane);
            // dS^T = P^T o (dP^T o Z - D), kept in st
#pragma unroll
            for (int nt = 0; nt < QT; ++nt)
#pragma unroll
                for (int c = 0; c < 4; ++c)
                    st[0][nt][c] *= dropped(dpt[0][nt][c], nt, c) - sDb[nt * 8 + 2 * t + (c & 1)];
            // dK += dS^T Q
            mma_pb<1, E_PAD / 16, BLOCK_M / 16>(dk_acc, st, Identity{}, sQb, Q_PITCH, lane);
        }
    }
    if constexpr (WITH_DK) store_frag_rows<ET>(dkb, dk_sm, dk_acc[0], scale, n0 + krow0, slice.S, HEAD_DIM, lane);
    if constexpr (WITH_DV) store_frag_rows<EVT>(dvb, dv_sm, dv_acc[0], 1.f, n0 + krow0, slice.S, HEAD_DIM_V, lane);
}

// ---------------------------------------------------------------------------------------------------
namespace dqk {
constexpr int NUM_WARPS = DQ_WARPS;
constexpr int NTHREADS = NUM_WARPS * 32;
constexpr int MT = DQ_M_TILES;
constexpr int WARP_M = 16 * MT;
constexpr int BLOCK_M = NUM_WARPS * WARP_M;
constexpr int BLOCK_N = DQ_BLOCK_N;
constexpr int NT = BLOCK_N / 8, ET = E_PAD / 8;
constexpr int SK_ELEMS = BLOCK_N * Q_PITCH, SV_ELEMS = BLOCK_N * V_PITCH;
static_assert(BLOCK_N % 16 == 0, "DQ_BLOCK_N must be a multiple of 16");
}  // namespace dqk

extern "C" __global__ void __launch_bounds__(dqk::NTHREADS)
flash_bwd_dq(const elem_t* __restrict__ q, const elem_t* __restrict__ k, const elem_t* __restrict__ v,
             const elem_t* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
             elem_t* __restrict__ dq, const int* __restrict__ cu_q, const int* __restrict__ cu_k, int L, int S,
             int Hq, int group, long long q_sb, long long q_sh, long long q_sm, long long k_sb, long long k_sh,
             long long k_sm, long long v_sb, long long v_sh, long long v_sm, long long do_sb, long long do_sh,
             long long do_sm, long long dq_sb, long long dq_sh, long long dq_sm, long long lse_sb,
             long long lse_sh, float scale, float scale_log2, int left, int right, int lower_right,
             unsigned int seed_lo, unsigned int seed_hi, unsigned int offset, unsigned int threshold,
             float rp_dropout) {
    using namespace dqk;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    elem_t* sQ = reinterpret_cast<elem_t*>(smem_raw);  // [BLOCK_M][Q_PITCH]
    elem_t* sdO = sQ + BLOCK_M * Q_PITCH;               // [BLOCK_M][V_PITCH]
    elem_t* sK = sdO + BLOCK_M * V_PITCH;               // [2][BLOCK_N][Q_PITCH]
    elem_t* sV = sK + 2 * SK_ELEMS;                     // [2][BLOCK_N][V_PITCH]

    const int m_block = gridDim.x - 1 - blockIdx.x;
    const Slice slice = Slice::per_query_head(Hq, group, cu_q, cu_k, L, S, left, right, lower_right);
    const int m0 = m_block * BLOCK_M;
    if (m0 >= slice.L) return;
    const Visibility<int>& vis = slice.vis;
    const elem_t* qb = slice.query_rows(q, q_sb, q_sh, q_sm);
    const elem_t* kb = slice.key_rows(k, k_sb, k_sh, k_sm);
    const elem_t* vb = slice.key_rows(v, v_sb, v_sh, v_sm);
    const elem_t* dob = slice.query_rows(dout, do_sb, do_sh, do_sm);
    elem_t* dqb = slice.query_rows(dq, dq_sb, dq_sh, dq_sm);
    const long long lse_off = slice.stats_offset(lse_sb, lse_sh);

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int wrow0 = warp * WARP_M;
    float dq_acc[MT][ET][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int x = 0; x < ET; ++x) dq_acc[mt][x][0] = dq_acc[mt][x][1] = dq_acc[mt][x][2] = dq_acc[mt][x][3] = 0.f;

    const int m1 = min(m0 + BLOCK_M, slice.L);
    int j_lo, j_hi, i_lo, i_hi;
    vis.key_range(m0, m1, j_lo, j_hi);
    vis.query_range(0, slice.S, i_lo, i_hi);
    const int n_begin = j_lo / BLOCK_N, n_end = j_lo < j_hi ? (j_hi + BLOCK_N - 1) / BLOCK_N : n_begin;
    if (n_begin < n_end) {
        load_tile<BLOCK_M, HEAD_DIM, E_PAD, Q_PITCH, NTHREADS>(sQ, qb, q_sm, m0, i_lo, i_hi);
        load_tile<BLOCK_M, HEAD_DIM_V, EV_PAD, V_PITCH, NTHREADS>(sdO, dob, do_sm, m0, i_lo, i_hi);
        load_tile<BLOCK_N, HEAD_DIM, E_PAD, Q_PITCH, NTHREADS>(sK, kb, k_sm, n_begin * BLOCK_N, j_lo, j_hi);
        load_tile<BLOCK_N, HEAD_DIM_V, EV_PAD, V_PITCH, NTHREADS>(sV, vb, v_sm, n_begin * BLOCK_N, j_lo, j_hi);
    }
    cp_async_commit();
    // Per-row lse (log2 domain; +inf for rows that see nothing so P = 0) and D. Rows that see nothing store
    // dQ = 0 (bit 2 mt + r of `empty`): their dS is 0, but 0 * NaN in a K row that other rows of the block
    // see is NaN. A bit mask, not i_lo / i_hi kept live over the loop: those cost spills.
    float lse2[MT][2], d_row[MT][2];
    u32 empty = 0;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int i = m0 + wrow0 + mt * 16 + g + 8 * r;
            const bool in = i >= i_lo && i < i_hi;
            const float l = in ? lse[lse_off + i] : CUSDPA_INF;
            lse2[mt][r] = l == -CUSDPA_INF ? CUSDPA_INF : __fmul_rn(l, LOG2E);
            d_row[mt][r] = in ? delta[lse_off + i] : 0.f;
            if (!in) empty |= 1u << (2 * mt + r);
        }
#if IS_DROPOUT
    const Dropout drop{seed_lo, seed_hi, offset, threshold};
#endif

    for (int n = n_begin; n < n_end; ++n) {
        const int buf = (n - n_begin) & 1, n0 = n * BLOCK_N;
        const elem_t* sKn = sK + buf * SK_ELEMS;
        const elem_t* sVn = sV + buf * SV_ELEMS;
        cp_async_wait<0>();
        __syncthreads();  // K_n, V_n landed; every warp is done with the other buffers
        if (n + 1 < n_end) {
            load_tile<BLOCK_N, HEAD_DIM, E_PAD, Q_PITCH, NTHREADS>(sK + (buf ^ 1) * SK_ELEMS, kb, k_sm, n0 + BLOCK_N,
                                                                   j_lo, j_hi);
            load_tile<BLOCK_N, HEAD_DIM_V, EV_PAD, V_PITCH, NTHREADS>(sV + (buf ^ 1) * SV_ELEMS, vb, v_sm,
                                                                      n0 + BLOCK_N, j_lo, j_hi);
        }
        cp_async_commit();

        // S = Q K^T and dP = dO V^T
        float s[MT][NT][4], dp[MT][NT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int c = 0; c < 4; ++c) s[mt][nt][c] = dp[mt][nt][c] = 0.f;
        mma_abt<MT, BLOCK_N / 16, E_PAD / 16>(s, sQ + wrow0 * Q_PITCH, Q_PITCH, sKn, Q_PITCH, lane);
        mma_abt<MT, BLOCK_N / 16, EV_PAD / 16>(dp, sdO + wrow0 * V_PITCH, V_PITCH, sVn, V_PITCH, lane);
        // dS = P o (dP o Z - D), into s
        const bool full = vis.tile_full(m0, BLOCK_M, n0, BLOCK_N);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int i = m0 + wrow0 + mt * 16 + g + 8 * r;
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    const int j0 = n0 + nt * 8 + 2 * t;
                    bool keep0 = true, keep1 = true;
#if IS_DROPOUT
                    drop.keep_pair(slice.bh, i, j0, keep0, keep1);
#endif
#pragma unroll
                    for (int c = 0; c < 2; ++c) {
                        const bool vis_ij = full || vis.visible(i, j0 + c);
                        const float p =
                            vis_ij ? exp2f(__fmul_rn(s[mt][nt][2 * r + c], scale_log2) - lse2[mt][r]) : 0.f;
                        const bool kept = c == 0 ? keep0 : keep1;
                        const float dpz = kept ? dp[mt][nt][2 * r + c] * rp_dropout : 0.f;
                        s[mt][nt][2 * r + c] = p * (dpz - d_row[mt][r]);
                    }
                }
            }
        // dQ += dS K
        mma_pb<MT, E_PAD / 16, BLOCK_N / 16>(dq_acc, s, Identity{}, sKn, Q_PITCH, lane);
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
        store_frag_rows<ET>(dqb, dq_sm, dq_acc[mt], scale, m0 + wrow0 + mt * 16, slice.L, HEAD_DIM, lane,
                            empty >> (2 * mt));
}
