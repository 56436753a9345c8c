// FLASH forward for Hopper (sm_90a): the FlashAttention-2 loop of flash_fwd.cu with both products on
// warpgroup tensor-core instructions (wgmma), which read their operands straight from shared memory.
//
// Each warpgroup (4 warps, 128 threads) owns 64 query rows. S = Q K^T is one chain of m64nBLOCK_Nk16
// wgmmas with Q and K in shared memory; O += P V takes P from registers (the S accumulator layout is the
// A-fragment layout) and V from shared memory, transposed by the instruction. Tiles are stored in the
// 128-byte swizzle the wgmma descriptors expect: [D / 64][rows][64] with the 16-byte chunk c of row r at
// chunk c ^ (r % 8), so the 8 rows of a core matrix hit 8 different bank groups.
//
// The products of two key blocks overlap inside each warpgroup (FlashAttention-3's intra-warpgroup
// pipelining): S = Q K^T of block n + 1 and O += P V of block n are issued together, and
// the softmax of block n + 1 runs on the CUDA cores while the tensor cores finish P V of block n. The
// O rescale by alpha then waits for that P V, so the max update and the exponentials never wait on it.
//
// Extra -D options: FWD90_WARPGROUPS, FWD90_BLOCK_N, FWD90_MIN_BLOCKS. Needs E and Ev in {64, 128}.
#include "flash_common.cuh"
// @WGMMA_WRAPPERS@

constexpr int NWG = FWD90_WARPGROUPS;
constexpr int NTHREADS = NWG * 128;
constexpr int BLOCK_M = NWG * 64;
constexpr int BLOCK_N = FWD90_BLOCK_N;
constexpr int NT = BLOCK_N / 8;  // n8 tiles of a warp's score rows
constexpr int VT = HEAD_DIM_V / 8;
constexpr int SQ_BYTES = BLOCK_M * HEAD_DIM * 2;
constexpr int SK_BYTES = BLOCK_N * HEAD_DIM * 2;
constexpr int SV_BYTES = BLOCK_N * HEAD_DIM_V * 2;
static_assert(HEAD_DIM % 64 == 0 && HEAD_DIM_V % 64 == 0 && HEAD_DIM <= 128 && HEAD_DIM_V <= 128,
              "the sm90 kernel takes E, Ev in {64, 128}");
static_assert(BLOCK_N == 64 || BLOCK_N == 128, "FWD90_BLOCK_N must be 64 or 128");

// Rows [row0, row0 + ROWS) of a row-major global matrix of D columns into the swizzled layout; rows
// outside [row_lo, row_hi) become zeros.
template <int ROWS, int D>
__device__ __forceinline__ void load_tile_sw128(unsigned char* s, const elem_t* g, long long pitch, int row0,
                                                int row_lo, int row_hi) {
    constexpr int CHUNKS = D / 8;
#pragma unroll
    for (int c = threadIdx.x; c < ROWS * CHUNKS; c += NTHREADS) {
        const int r = c / CHUNKS, ch = c % CHUNKS, row = row0 + r;
        const bool pred = row >= row_lo && row < row_hi;
        unsigned char* dst = s + (ch / 8) * (ROWS * 128) + r * 128 + (((ch % 8) ^ (r % 8)) * 16);
        cp_async_16(reinterpret_cast<elem_t*>(dst), pred ? g + row * pitch + ch * 8 : g, pred);
    }
}

// Shared-memory matrix descriptor, 128-byte swizzle. K-major operands (Q, K) step through K within a
// swizzle row by moving the start address 32 bytes per k16; the leading offset is unused for them.
// For V (MN-major) the leading offset is the distance between 64-column chunks and the stride offset
// the distance between groups of 8 rows.
__device__ __forceinline__ unsigned long long sw128_desc(const void* p, unsigned lbo, unsigned sbo) {
    const unsigned long long addr = static_cast<unsigned>(__cvta_generic_to_shared(p));
    return ((addr & 0x3FFFF) >> 4) | (static_cast<unsigned long long>(lbo >> 4) << 16) |
           (static_cast<unsigned long long>(sbo >> 4) << 32) | (1ull << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// After the wait: tell the compiler the accumulators change here, so no read of them moves above it.
template <int N>
__device__ __forceinline__ void fence_regs(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// Before wgmma.fence, the same pins the last definition of a wgmma's input registers (P, and S and O
// after their conditional updates): a register move the compiler sinks between wgmma.fence and the
// wgmma makes ptxas serialise the wgmmas (C7513).
template <int N>
__device__ __forceinline__ void fence_regs(u32 (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+r"(d[i])::"memory");
}
// Generic-proxy writes (cp.async, zero fill) must be ordered before the tensor cores' async-proxy reads.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// S = Q K^T for this warpgroup's 64 rows and one key block (issued, not waited for).
__device__ __forceinline__ void issue_qk(float (&s)[NT * 4], const unsigned char* sQwg, const unsigned char* sKn) {
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
        const int chunk = kk / 4, inner = (kk % 4) * 32;
        const unsigned long long da = sw128_desc(sQwg + chunk * BLOCK_M * 128 + inner, 16, 1024);
        const unsigned long long db = sw128_desc(sKn + chunk * BLOCK_N * 128 + inner, 16, 1024);
        wgmma_ss(s, da, db, kk > 0);
    }
}

// acc += P V for one key block, P from registers (issued, not waited for).
__device__ __forceinline__ void issue_pv(float (&acc)[VT * 4], const u32 (&p)[NT * 2], const unsigned char* sVn) {
#pragma unroll
    for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
        const u32 a[4] = {p[4 * kk], p[4 * kk + 1], p[4 * kk + 2], p[4 * kk + 3]};
        wgmma_rs(acc, a, sw128_desc(sVn + kk * 16 * 128, BLOCK_N * 128, 1024));
    }
}

// Online softmax of one key block for this thread's rows i (g) and i + 8: masks the scores, moves the row
// maxima m_i, rescales l_i, and turns the scores into P (rounded to elem, dropout applied; l_i sums P
// before dropout). alpha[r] is the factor the output accumulated so far needs; the return value says
// whether any row of the warp changed its max (else alpha is 1 everywhere and the rescale is skipped).
__device__ __forceinline__ bool softmax_block(float (&s)[NT * 4], u32 (&p)[NT * 2], float (&m_i)[2], float (&l_i)[2],
                                              float (&alpha)[2], const Visibility<int>& vis, bool full, int i, int n0,
                                              int t, float scale_log2, const Dropout& drop, u32 bh) {
    float m_use[2];
    bool rescale = false;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (!full) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int c = 0; c < 2; ++c)
                    if (!vis.visible(i + 8 * r, n0 + nt * 8 + 2 * t + c)) s[nt * 4 + 2 * r + c] = -CUSDPA_INF;
        }
        float mx = -CUSDPA_INF;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[nt * 4 + 2 * r], s[nt * 4 + 2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        // fmaxf skips NaN: a NaN score poisons the row through its p = exp2(NaN) instead.
        const float m_new = fmaxf(m_i[r], __fmul_rn(mx, scale_log2));
        m_use[r] = m_new == -CUSDPA_INF ? 0.f : m_new;  // a row with nothing visible yet: exp2(-inf) = 0
        alpha[r] = exp2f(m_i[r] - m_use[r]);
        rescale |= m_new != m_i[r];
        m_i[r] = m_new;
        l_i[r] *= alpha[r];
    }
    // Scores rounded alone, as the row max was, so the max element gets exp2(0) = 1 exactly (flash_fwd.cu
    // says why a fused fmaf would overflow on large scores).
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float p0 = exp2f(__fmul_rn(s[nt * 4 + 2 * r], scale_log2) - m_use[r]);
            float p1 = exp2f(__fmul_rn(s[nt * 4 + 2 * r + 1], scale_log2) - m_use[r]);
            l_i[r] += p0 + p1;
#if IS_DROPOUT
            bool keep0, keep1;
            drop.keep_pair(bh, i + 8 * r, n0 + nt * 8 + 2 * t, keep0, keep1);
            p0 = keep0 ? p0 : 0.f;
            p1 = keep1 ? p1 : 0.f;
#endif
            p[nt * 2 + r] = pack2<IS_BF16>(p0, p1);  // n8 tile nt -> p[2 nt] (row g), p[2 nt + 1] (row g + 8)
        }
    }
    return __any_sync(0xffffffffu, rescale);
}

__device__ __forceinline__ void rescale_acc(float (&acc)[VT * 4], const float (&alpha)[2]) {
#pragma unroll
    for (int x = 0; x < VT * 4; ++x) acc[x] *= alpha[(x % 4) / 2];
}

extern "C" __global__ void __launch_bounds__(NTHREADS, FWD90_MIN_BLOCKS)
flash_fwd_sm90(const elem_t* __restrict__ q, const elem_t* __restrict__ k, const elem_t* __restrict__ v,
               elem_t* __restrict__ o, float* __restrict__ lse, const int* __restrict__ cu_q,
               const int* __restrict__ cu_k, int L, int S, int Hq, int group,
               long long q_sb, long long q_sh, long long q_sm, long long k_sb, long long k_sh, long long k_sm,
               long long v_sb, long long v_sh, long long v_sm, long long o_sb, long long o_sh, long long o_sm,
               long long lse_sb, long long lse_sh, float scale_log2, int left, int right, int lower_right,
               unsigned int seed_lo, unsigned int seed_hi, unsigned int offset, unsigned int threshold,
               float rp_dropout) {
    extern __shared__ __align__(1024) unsigned char smem[];
    unsigned char* sQ = smem;                    // swizzle atoms need 1024-byte alignment: every size below
    unsigned char* sK = sQ + SQ_BYTES;           // is a multiple of 1024
    unsigned char* sV = sK + 2 * SK_BYTES;

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
    vis.key_range(m0, m1, j_lo, j_hi);
    vis.query_range(0, slice.S, i_lo, i_hi);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int wg = warp / 4;
    const int wrow0 = warp * 16;  // this warp's 16 rows: warpgroup wg's rows 64 wg + 16 (warp % 4)
    const int i = m0 + wrow0 + g;  // this thread's rows are i and i + 8
    if (j_lo >= j_hi) {
        for (int c = threadIdx.x; c < (m1 - m0) * (HEAD_DIM_V / 8); c += NTHREADS) {
            const int r = c / (HEAD_DIM_V / 8), ch = c % (HEAD_DIM_V / 8);
            *reinterpret_cast<uint4*>(ob + (m0 + r) * o_sm + ch * 8) = make_uint4(0, 0, 0, 0);
        }
        for (int r = threadIdx.x; r < m1 - m0; r += NTHREADS) lseb[m0 + r] = -CUSDPA_INF;
        return;
    }

    const int n_begin = j_lo / BLOCK_N, n_end = (j_hi + BLOCK_N - 1) / BLOCK_N;
    load_tile_sw128<BLOCK_M, HEAD_DIM>(sQ, qb, q_sm, m0, i_lo, i_hi);
    load_tile_sw128<BLOCK_N, HEAD_DIM>(sK, kb, k_sm, n_begin * BLOCK_N, j_lo, j_hi);
    cp_async_commit();
    load_tile_sw128<BLOCK_N, HEAD_DIM_V>(sV, vb, v_sm, n_begin * BLOCK_N, j_lo, j_hi);
    cp_async_commit();
    const Dropout drop{seed_lo, seed_hi, offset, threshold};
    const unsigned char* sQwg = sQ + wg * 64 * 128;

    float acc[VT * 4];
    float m_i[2] = {-CUSDPA_INF, -CUSDPA_INF}, l_i[2] = {0.f, 0.f}, alpha[2];
#pragma unroll
    for (int x = 0; x < VT * 4; ++x) acc[x] = 0.f;
    float s[NT * 4];
    u32 p[NT * 2];

    // Prologue: S and P of the first block. Then each step n issues S of block n + 1 and P V of block n,
    // so the softmax of block n + 1 overlaps P V of block n. Shared-memory buffers: K of block n in
    // sK[(n - n_begin) & 1], V likewise; the copies for blocks n + 1 (V) and n + 2 (K) go into the buffers
    // whose readers finished (waited for) in step n - 1.
    cp_async_wait<1>();
    fence_proxy_async();
    __syncthreads();
    if (n_begin + 1 < n_end)
        load_tile_sw128<BLOCK_N, HEAD_DIM>(sK + SK_BYTES, kb, k_sm, (n_begin + 1) * BLOCK_N, j_lo, j_hi);
    cp_async_commit();
    wgmma_fence();
    issue_qk(s, sQwg, sK);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(s);
    softmax_block(s, p, m_i, l_i, alpha, vis, vis.tile_full(m0, BLOCK_M, n_begin * BLOCK_N, BLOCK_N), i,
                  n_begin * BLOCK_N, t, scale_log2, drop, slice.bh);
    for (int n = n_begin; n + 1 < n_end; ++n) {  // unconditional wgmmas: a branch around one serialises them
        const int buf = (n - n_begin) & 1, n1 = (n + 1) * BLOCK_N;
        cp_async_wait<0>();  // V of block n and K of block n + 1
        fence_proxy_async();
        __syncthreads();
        load_tile_sw128<BLOCK_N, HEAD_DIM_V>(sV + (buf ^ 1) * SV_BYTES, vb, v_sm, n1, j_lo, j_hi);
        if (n + 2 < n_end) load_tile_sw128<BLOCK_N, HEAD_DIM>(sK + buf * SK_BYTES, kb, k_sm, n1 + BLOCK_N, j_lo, j_hi);
        cp_async_commit();

        fence_regs(p);
        fence_regs(s);
        fence_regs(acc);
        wgmma_fence();
        issue_qk(s, sQwg, sK + (buf ^ 1) * SK_BYTES);
        wgmma_commit();
        issue_pv(acc, p, sV + buf * SV_BYTES);
        wgmma_commit();
        wgmma_wait<1>();  // S of block n + 1; P V of block n still runs
        fence_regs(s);
        u32 p_next[NT * 2];
        const bool rescale = softmax_block(s, p_next, m_i, l_i, alpha, vis, vis.tile_full(m0, BLOCK_M, n1, BLOCK_N), i,
                                           n1, t, scale_log2, drop, slice.bh);
        wgmma_wait<0>();
        fence_regs(acc);
        if (rescale) rescale_acc(acc, alpha);
        // A move the compiler cannot see through: with a plain copy it writes P of block n + 1 straight
        // into the registers P V of block n is still reading, and ptxas serialises every wgmma (C7513).
#pragma unroll
        for (int x = 0; x < NT * 2; ++x) asm volatile("mov.b32 %0, %1;" : "=r"(p[x]) : "r"(p_next[x]));
    }
    cp_async_wait<0>();  // V of the last block
    fence_proxy_async();
    __syncthreads();
    fence_regs(p);
    fence_regs(acc);
    wgmma_fence();
    issue_pv(acc, p, sV + ((n_end - 1 - n_begin) & 1) * SV_BYTES);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(acc);

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l = l_i[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        // l = 0: the row sees nothing and stores 0, not acc * 0 (NaN after 0 * NaN of a V row another row
        // sees); l = NaN (a NaN or +inf score) stays NaN.
        const bool empty = l == 0.f;
        const float inv = rp_dropout / l;
        const int row = i + 8 * r;
        if (row < slice.L) {
#pragma unroll
            for (int vt = 0; vt < VT; ++vt)
                *reinterpret_cast<u32*>(ob + row * o_sm + vt * 8 + 2 * t) = pack2<IS_BF16>(
                    empty ? 0.f : acc[vt * 4 + 2 * r] * inv, empty ? 0.f : acc[vt * 4 + 2 * r + 1] * inv);
            if (t == 0) lseb[row] = empty ? -CUSDPA_INF : (m_i[r] + log2f(l)) * LN2;
        }
    }
}
