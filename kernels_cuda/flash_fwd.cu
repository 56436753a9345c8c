// FLASH forward: FlashAttention-2 on mma.sync tensor cores.
//
// One CTA computes BLOCK_M query rows of one (batch, head): each warp owns WARP_M = 16 * FWD_M_TILES rows
// (two m16 tiles share every K/V fragment read from shared memory, halving shared-memory traffic per
// mma). K and V tiles of BLOCK_N keys stream through a two-deep cp.async pipeline; scores stay in
// registers and are re-used as the A operand of P @ V (the m16n8 accumulator layout of two adjacent
// n-tiles is the m16k16 A layout). Online softmax runs in the log2 domain with the scale folded in.
// Tiles that no row of the block may see are never loaded; only tiles that straddle the boundary of
// the visible band (causal / window / sequence end) pay for the per-element mask.
//
// Extra -D options: FWD_WARPS, FWD_M_TILES, FWD_BLOCK_N.
#include "flash_common.cuh"

constexpr int NUM_WARPS = FWD_WARPS;
constexpr int NTHREADS = NUM_WARPS * 32;
constexpr int MT = FWD_M_TILES;
constexpr int WARP_M = 16 * MT;
constexpr int BLOCK_M = NUM_WARPS * WARP_M;
constexpr int BLOCK_N = FWD_BLOCK_N;
constexpr int NT = BLOCK_N / 8;  // n8 tiles of a score row block
constexpr int VT = EV_PAD / 8;   // n8 tiles of an output row block
constexpr int O_PITCH = V_PITCH;
// sQ is reused to stage the output for coalesced 16-byte stores, so it holds whichever is wider.
constexpr int SQ_ELEMS = BLOCK_M * (Q_PITCH > O_PITCH ? Q_PITCH : O_PITCH);
constexpr int SK_ELEMS = BLOCK_N * Q_PITCH;
constexpr int SV_ELEMS = BLOCK_N * V_PITCH;
static_assert(BLOCK_N % 16 == 0, "BLOCK_N must be a multiple of 16");

__device__ __forceinline__ void store_rows(elem_t* ob, long long o_sm, const elem_t* s, int r0, int rows, int row_limit) {
    constexpr int CHUNKS = HEAD_DIM_V / 8;
    for (int c = threadIdx.x; c < rows * CHUNKS; c += NTHREADS) {
        int r = c / CHUNKS, ch = c % CHUNKS, row = r0 + r;
        if (row < row_limit) {
            uint4 val = s ? *reinterpret_cast<const uint4*>(s + r * O_PITCH + ch * 8) : make_uint4(0, 0, 0, 0);
            *reinterpret_cast<uint4*>(ob + row * o_sm + ch * 8) = val;
        }
    }
}

extern "C" __global__ void __launch_bounds__(NTHREADS)
flash_fwd(const elem_t* __restrict__ q, const elem_t* __restrict__ k, const elem_t* __restrict__ v,
          elem_t* __restrict__ o, float* __restrict__ lse, const int* __restrict__ cu_q,
          const int* __restrict__ cu_k, int L, int S, int Hq, int group,
          long long q_sb, long long q_sh, long long q_sm, long long k_sb, long long k_sh, long long k_sm,
          long long v_sb, long long v_sh, long long v_sm, long long o_sb, long long o_sh, long long o_sm,
          long long lse_sb, long long lse_sh, float scale_log2, int left, int right, int lower_right,
          unsigned int seed_lo, unsigned int seed_hi, unsigned int offset, unsigned int threshold,
          float rp_dropout) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    elem_t* sQ = reinterpret_cast<elem_t*>(smem_raw);
    elem_t* sK = sQ + SQ_ELEMS;      // [2][BLOCK_N][Q_PITCH]
    elem_t* sV = sK + 2 * SK_ELEMS;  // [2][BLOCK_N][V_PITCH]

    // Reverse order: under causal masking the last query blocks have the most keys; start them first.
    const int m_block = gridDim.x - 1 - blockIdx.x;
    const Slice slice = Slice::per_query_head(Hq, group, cu_q, cu_k, L, S, left, right, lower_right);
    const int m0 = m_block * BLOCK_M;
    if (m0 >= slice.L) return;
    const Visibility<int>& vis = slice.vis;
    const elem_t* qb = slice.query_rows(q, q_sb, q_sh, q_sm);
    const elem_t* kb = slice.key_rows(k, k_sb, k_sh, k_sm);
    const elem_t* vb = slice.key_rows(v, v_sb, v_sh, v_sm);
    elem_t* ob = slice.query_rows(o, o_sb, o_sh, o_sm);
    float* lseb = lse + slice.stats_offset(lse_sb, lse_sh);

    const int m1 = min(m0 + BLOCK_M, slice.L);
    int j_lo, j_hi, i_lo, i_hi;
    vis.key_range(m0, m1, j_lo, j_hi);        // keys some row of this block sees
    vis.query_range(0, slice.S, i_lo, i_hi);  // rows that see any key at all
    if (j_lo >= j_hi) {  // no row of the block sees a key: output 0, lse -inf
        store_rows(ob, o_sm, nullptr, m0, BLOCK_M, slice.L);
        for (int r = threadIdx.x; r < m1 - m0; r += NTHREADS) lseb[m0 + r] = -CUSDPA_INF;
        return;
    }

    // Rows that see nothing are zero-filled (NaN stored there must not reach anything) and keys that no
    // row of this block sees likewise.
    load_tile<BLOCK_M, HEAD_DIM, E_PAD, Q_PITCH, NTHREADS>(sQ, qb, q_sm, m0, i_lo, i_hi);
    const int n_begin = j_lo / BLOCK_N, n_end = (j_hi + BLOCK_N - 1) / BLOCK_N;
    load_tile<BLOCK_N, HEAD_DIM, E_PAD, Q_PITCH, NTHREADS>(sK, kb, k_sm, n_begin * BLOCK_N, j_lo, j_hi);
    cp_async_commit();
    load_tile<BLOCK_N, HEAD_DIM_V, EV_PAD, V_PITCH, NTHREADS>(sV, vb, v_sm, n_begin * BLOCK_N, j_lo, j_hi);
    cp_async_commit();

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int wrow0 = warp * WARP_M;
#if IS_DROPOUT
    const Dropout drop{seed_lo, seed_hi, offset, threshold};
#endif

    float acc[MT][VT][4];
    float m_i[MT][2], l_i[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int vt = 0; vt < VT; ++vt) acc[mt][vt][0] = acc[mt][vt][1] = acc[mt][vt][2] = acc[mt][vt][3] = 0.f;
        m_i[mt][0] = m_i[mt][1] = -CUSDPA_INF;
        l_i[mt][0] = l_i[mt][1] = 0.f;
    }

    for (int n = n_begin; n < n_end; ++n) {
        const int buf = (n - n_begin) & 1, n0 = n * BLOCK_N;
        const elem_t* sKn = sK + buf * SK_ELEMS;
        const elem_t* sVn = sV + buf * SV_ELEMS;
        cp_async_wait<1>();  // Q and K_n have landed; V_n may still be in flight
        __syncthreads();
        // K_{n-1}'s buffer is free: every warp passed the barrier after its last read of it.
        if (n + 1 < n_end)
            load_tile<BLOCK_N, HEAD_DIM, E_PAD, Q_PITCH, NTHREADS>(sK + (buf ^ 1) * SK_ELEMS, kb, k_sm, n0 + BLOCK_N,
                                                                   j_lo, j_hi);
        cp_async_commit();

        float s[MT][NT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
        mma_abt<MT, BLOCK_N / 16, E_PAD / 16>(s, sQ + wrow0 * Q_PITCH, Q_PITCH, sKn, Q_PITCH, lane);

        const bool full = vis.tile_full(m0, BLOCK_M, n0, BLOCK_N);
        float m_use[MT][2], alpha[MT][2];
        bool rescale = false;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int i = m0 + wrow0 + mt * 16 + g + 8 * r;
                if (!full) {
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                        for (int c = 0; c < 2; ++c)
                            if (!vis.visible(i, n0 + nt * 8 + 2 * t + c)) s[mt][nt][2 * r + c] = -CUSDPA_INF;
                }
                float mx = -CUSDPA_INF;
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                // fmaxf skips NaN: a NaN score poisons the row through its p = exp2(NaN) instead.
                const float m_new = fmaxf(m_i[mt][r], __fmul_rn(mx, scale_log2));
                // A row with nothing visible yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
                m_use[mt][r] = m_new == -CUSDPA_INF ? 0.f : m_new;
                alpha[mt][r] = exp2f(m_i[mt][r] - m_use[mt][r]);
                rescale |= m_new != m_i[mt][r];
                m_i[mt][r] = m_new;
                l_i[mt][r] *= alpha[mt][r];
            }
        }
        // Once the running maxima settle, most blocks change no row's max: skip the O(Ev) rescale then
        // (warp-uniform branch, alpha == 1 exactly when the max is unchanged).
        if (__any_sync(0xffffffffu, rescale)) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int vt = 0; vt < VT; ++vt)
#pragma unroll
                    for (int c = 0; c < 4; ++c) acc[mt][vt][c] *= alpha[mt][c / 2];
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int i = m0 + wrow0 + mt * 16 + g + 8 * r;
                (void)i;  // read by the dropout keep test
                // Each scaled score is rounded alone, as the row max was (rounding is monotonic, so m is the
                // largest of these products): the max element gets exp2(0) = 1 exactly. fmaf(s, scale_log2,
                // -m) would subtract the rounded max from the exact product, off by up to half an ulp of it:
                // thousands at |s| ~ 1e12 (q = k = 133120 in bf16), so exp2 overflows (inf / inf = NaN).
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    float p0 = exp2f(__fmul_rn(s[mt][nt][2 * r], scale_log2) - m_use[mt][r]);
                    float p1 = exp2f(__fmul_rn(s[mt][nt][2 * r + 1], scale_log2) - m_use[mt][r]);
                    l_i[mt][r] += p0 + p1;  // the softmax normaliser is taken before dropout
#if IS_DROPOUT
                    bool keep0, keep1;
                    drop.keep_pair(slice.bh, i, n0 + nt * 8 + 2 * t, keep0, keep1);
                    p0 = keep0 ? p0 : 0.f;
                    p1 = keep1 ? p1 : 0.f;
#endif
                    s[mt][nt][2 * r] = p0;
                    s[mt][nt][2 * r + 1] = p1;
                }
            }
        }

        cp_async_wait<1>();  // V_n has landed; K_{n+1} may still be in flight
        __syncthreads();
        if (n + 1 < n_end)
            load_tile<BLOCK_N, HEAD_DIM_V, EV_PAD, V_PITCH, NTHREADS>(sV + (buf ^ 1) * SV_ELEMS, vb, v_sm, n0 + BLOCK_N,
                                                                      j_lo, j_hi);
        cp_async_commit();

        mma_pb<MT, EV_PAD / 16, BLOCK_N / 16>(acc, s, Identity{}, sVn, V_PITCH, lane);
    }

    // Epilogue: normalise, stage through shared memory (every warp is done with sQ), store 16-byte rows.
    __syncthreads();
    elem_t* sO = sQ;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float l = l_i[mt][r];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            // l >= 1 on a row that sees a finite score, NaN on one that sees NaN or +inf (and stays NaN),
            // 0 on one that sees nothing: that row stores 0, not acc * 0, since acc is NaN when a V row
            // another row of the block sees holds NaN (P = 0 there, but 0 * NaN = NaN).
            const bool empty = l == 0.f;
            const float inv = rp_dropout / l;
            const int row = wrow0 + mt * 16 + g + 8 * r;
#pragma unroll
            for (int vt = 0; vt < VT; ++vt)
                *reinterpret_cast<u32*>(sO + row * O_PITCH + vt * 8 + 2 * t) =
                    pack2<IS_BF16>(empty ? 0.f : acc[mt][vt][2 * r] * inv, empty ? 0.f : acc[mt][vt][2 * r + 1] * inv);
            if (t == 0 && m0 + row < slice.L) lseb[m0 + row] = empty ? -CUSDPA_INF : (m_i[mt][r] + log2f(l)) * LN2;
        }
    }
    __syncthreads();
    store_rows(ob, o_sm, sO, m0, BLOCK_M, slice.L);
}
