// FLASH forward for Hopper (sm_90a), built as FlashAttention-3 builds its forward.
//
// Warp specialisation. Warpgroup 0 is the producer: one warp moves Q, K and V tiles into shared memory
// with TMA (cp.async.bulk.tensor), K and V through a ring of STAGES buffers guarded by mbarriers ("full":
// the bytes arrived; "empty": every consumer warp is done reading). Warpgroups 1..MMA_WG are consumers,
// 64 query rows each, computing with wgmma from shared memory. setmaxnreg hands the producer's registers
// (it needs few) to the consumers, which hold S, P and O in registers.
//
// Overlap at three levels:
//  - across tiles: the grid is persistent (one CTA per SM); the producer loads the next tile's Q, K and V
//    while the consumers finish the current tile, and the Q buffer is released as soon as its last
//    product is done, before the epilogue.
//  - across warpgroups (ping-pong): consumers take turns issuing their products (named barriers, in a
//    cycle), so one warpgroup's softmax runs on the CUDA cores while another's products run on the tensor
//    cores.
//  - inside a warpgroup: S = Q K^T of block n + 1 is issued with O += P V of block n, and the softmax of
//    block n + 1 runs while P V of block n finishes; P is rounded into the wgmma operand registers only
//    once P V of block n is done with them.
//
// Tiles are (batch * head, query block) pairs in this order: heads in chunks of `chunk_heads` (few enough
// that their K and V stay in L2), and within a chunk the query blocks from the last (the heaviest under
// causal masking) to the first, heads innermost. Without an attn_mask they are dealt statically: by the
// host's `schedule` where it gives one (FWD90_SCHEDULE: each tile in turn to the CTA with the least work so far,
// counted in key blocks: under a causal band the round-robin deal below gave CTA 0 the heaviest tile of every
// round), else tile t to CTA t % gridDim.x. With one, a tile's work is its visible blocks, which the host does not
// know: CTAs take tiles from a counter as they finish them (TileQueue, FWD90_QUEUE), as they may in a packed
// batch, whose sequences' lengths the host does not know either.
//
// Shared memory: Q [E/W][BLOCK_M][W], K [STAGES][E/W][BLOCK_N][W], V [STAGES][Ev/W'][BLOCK_N][W'], each
// column chunk in the swizzle that TMA writes and wgmma reads: W = 64 columns (128-byte rows, 16-byte
// chunk c of row r at c ^ (r % 8)) when the head dim is a multiple of 64, else W = 32 (64-byte rows,
// c ^ ((r / 2) % 4)); then O's staging (FWD90_TMA_STORE) and the split tiles' hand-over (FWD90_SPLIT_LAST) buffers,
// the mbarriers, and the TileQueue's barriers and slots.
//
// Rows no query may see. TMA writes zeros for rows outside the tensor. A V block that reaches past the
// keys the slice's queries see (windows, upper-left causal with S > L, the next sequence of a packed
// batch) has those rows zeroed by the producer before the consumers may read it, so NaN stored there never
// meets a P of 0. K needs nothing: its scores there are selected out.
//
// attn_mask (ATTN_MASK: 0 none, 1 bool (a byte, nonzero = attend), 2 float16, 3 bfloat16, 4 float32, added
// to the scaled scores): each consumer thread reads the mask elements of its own score fragment (pairs of
// neighbouring keys of rows i and i + 8) straight from global memory through the mask's strides (b, h,
// row; 0 on broadcast dims, the keys contiguous), a block ahead of their use so that the loads fly while
// the softmax and the next products run. A bool mask selects scores out (-inf) in the usual log2 domain. With a float
// mask the scores are kept in natural units (s * scale + mask, the row max m of those, p = exp2((s - m) *
// log2 e)): scaling a mask of -3.4e38 (a dtype's min, what models pass for "masked") into the log2 domain
// would overflow to -inf and turn a row PyTorch attends uniformly into an empty one. With the mask's block
// summary (`blocks`, made by the host), key blocks whose pairs are all masked are skipped by the producer
// and the consumers alike, and blocks with every pair visible read no mask.
//
// Extra -D options: FWD90_QUEUE (1: tiles dealt by TileQueue, as CTAs finish them; always with a mask),
// FWD90_TMA_STORE (1: each consumer warpgroup stages its O rows in shared memory and one thread stores them with
// TMA, so the warpgroup's epilogue is shared-memory writes and the store runs on under its next tile, as
// FlashAttention-3's epilogue does; dense problems only, tensor map `tm_o`: a packed batch's store would clip at
// the tensor's end, not at the sequence's), FWD90_SKIP_IDLE (1: a consumer warpgroup whose rows all lie past the
// queries computes nothing, walk_idle), FWD90_WG_BLOCKS (1: each consumer warpgroup stops at the last key
// block its own rows see and walks the tile's blocks past it), FWD90_SPLIT_LAST (1: a tile whose rows fill the first
// warpgroup only is computed by every warpgroup, each on its share of the key blocks: the consumers' split tile),
// FWD90_SCHEDULE (1: the tiles dealt by the host's `schedule`, TileDeal), CUSDPA_PHASES (1: per-warp phase clocks,
// phases.cuh),
// FWD90_WARPGROUPS (consumer warpgroups, 2 or 3), FWD90_BLOCK_N, FWD90_STAGES (K/V buffers), FWD90_PINGPONG
// (1: consumers take turns; 0: they issue when ready), ATTN_MASK, ALIBI (1: the slopes' bias added, `slopes`
// per (batch, head) with batch stride `slopes_b`; scores in natural units as with a float mask), SOFTCAP (1:
// scores soft-capped by `softcap` first), FWD90_CLUSTER (2: clusters of two CTAs share each K and V block, below).
// E and Ev multiples of 32 up to 256.
//
// Clusters (FWD90_CLUSTER = 2, FlashAttention-3's choice where every tile of a head reads the same key blocks:
// no causal band, window or mask, a dense batch, an even number of query blocks). The two CTAs of a cluster take
// neighbouring query blocks of one head, tile for tile, so they walk the same key blocks in the same order; each
// CTA's producer loads half of each K and V block's rows and multicasts them into both CTAs' buffers, which
// halves the K/V bytes read from L2 (at E = 128 a CTA otherwise reads 64 KB a key block, about 4 TB/s over the
// card at 500 TFLOP/s). A buffer is refilled only once the consumers of both CTAs have released it: each
// consumer warp arrives on the empty barrier of each CTA of the cluster (2 x CONSUMER_WARPS arrivals a phase),
// and a full barrier counts the whole block's bytes, this CTA's half and its neighbour's. Q and O stay the
// CTA's own. The CTAs meet at a cluster barrier after the barriers' initialisation (no arrival or copy before
// it) and before they exit (no arrival reaches a CTA that is gone).
#include "sm90.cuh"
#include "phases.cuh"
// @WGMMA_WRAPPERS@ FWD90_BLOCK_N HEAD_DIM_V

#ifndef FWD90_QUEUE
#define FWD90_QUEUE 0
#endif
#ifndef FWD90_TMA_STORE
#define FWD90_TMA_STORE 0
#endif
#ifndef FWD90_SKIP_IDLE
#define FWD90_SKIP_IDLE 0
#endif
#ifndef FWD90_WG_BLOCKS
#define FWD90_WG_BLOCKS 0
#endif
#ifndef FWD90_CLUSTER
#define FWD90_CLUSTER 1
#endif
#ifndef FWD90_SPLIT_LAST
#define FWD90_SPLIT_LAST 0
#endif
#ifndef FWD90_SCHEDULE
#define FWD90_SCHEDULE 0
#endif
constexpr int CLUSTER = FWD90_CLUSTER;
static_assert(CLUSTER == 1 || CLUSTER == 2, "FWD90_CLUSTER must be 1 or 2");
static_assert(CLUSTER == 1 || !FWD90_QUEUE, "clusters take their tiles in pairs, not from the queue");
// (a cluster's CTAs walk their key blocks in step: a split tile would wait for its neighbour's whole tile)
static_assert(!FWD90_SPLIT_LAST || (CLUSTER == 1 && !ATTN_MASK), "split tiles: no clusters, no attn_mask");
static_assert(!FWD90_SCHEDULE || (CLUSTER == 1 && !FWD90_QUEUE), "clusters and the queue deal tiles of their own");
constexpr int MMA_WG = FWD90_WARPGROUPS;
constexpr int NTHREADS = (MMA_WG + 1) * 128;
constexpr int BLOCK_M = MMA_WG * 64;
constexpr int BLOCK_N = FWD90_BLOCK_N;
constexpr int STAGES = FWD90_STAGES;
constexpr int NT = BLOCK_N / 8;  // n8 tiles of a warp's score rows
constexpr int VT = HEAD_DIM_V / 8;
constexpr int SQ_BYTES = BLOCK_M * HEAD_DIM * 2;
constexpr int SK_BYTES = BLOCK_N * HEAD_DIM * 2;
constexpr int SV_BYTES = BLOCK_N * HEAD_DIM_V * 2;
// O's staging buffer (FWD90_TMA_STORE): each consumer warpgroup's 64 rows in V's swizzle.
constexpr int SO_BYTES = FWD90_TMA_STORE ? BLOCK_M * HEAD_DIM_V * 2 : 0;
// The split tiles' partial outputs (FWD90_SPLIT_LAST): each warpgroup but the first hands over its O accumulators
// and row statistics, float4 (VT + 1) x 128 threads, a thread's float4 k at [k][thread] (no bank conflicts).
constexpr int SPLIT_BYTES = FWD90_SPLIT_LAST ? (MMA_WG - 1) * (VT + 1) * 128 * 16 : 0;
constexpr int SMEM_TILES = SQ_BYTES + STAGES * (SK_BYTES + SV_BYTES) + SO_BYTES + SPLIT_BYTES;
constexpr int BAR_EPILOGUE = 4;  // named barriers 4 + cw: consumer warpgroup cw's epilogue (1..3: the ping-pong)
// named barriers of the split tiles' hand-over: the partial outputs written; read by the first warpgroup
constexpr int BAR_SPLIT_FULL = BAR_EPILOGUE + MMA_WG, BAR_SPLIT_READ = BAR_SPLIT_FULL + 1;
// Registers per thread after setmaxnreg (FlashAttention-3's split; the sums fill the 64K register file).
constexpr int LOAD_REGS = MMA_WG == 2 ? 24 : 32;
constexpr int MMA_REGS = MMA_WG == 2 ? 240 : 160;
constexpr int CONSUMER_WARPS = MMA_WG * 4;
static_assert(HEAD_DIM % 32 == 0 && HEAD_DIM_V % 32 == 0 && HEAD_DIM <= 256 && HEAD_DIM_V <= 256,
              "the sm90 kernel takes E, Ev multiples of 32 up to 256");
// Swizzle of each operand's tiles: bytes per row of a column chunk (128 or 64).
constexpr int QK_SW = HEAD_DIM % 64 == 0 ? 128 : 64;
constexpr int V_SW = HEAD_DIM_V % 64 == 0 ? 128 : 64;
static_assert(MMA_WG == 2 || MMA_WG == 3, "FWD90_WARPGROUPS must be 2 or 3");
static_assert(BLOCK_N % 16 == 0 && BLOCK_N >= 16 && BLOCK_N <= 256, "FWD90_BLOCK_N: a multiple of 16 up to 256");

// (ATTN_MASK, ALIBI, SOFTCAP, mask_t: sm90.cuh; NATURAL scores as the top of the file says)
#if ATTN_MASK == 1
typedef unsigned short mask_pair_t;  // two bytes, the lower key in the lower byte
#elif ATTN_MASK == 2
typedef __half2 mask_pair_t;
#elif ATTN_MASK == 3
typedef __nv_bfloat162 mask_pair_t;
#else
typedef float2 mask_pair_t;
#endif


// S = Q K^T for one warpgroup's 64 rows and one key block (issued, not waited for).
__device__ __forceinline__ void issue_qk(float (&s)[NT * 4], const unsigned char* sQwg, const unsigned char* sKn) {
    const unsigned long long da = sw_desc<QK_SW>(sQwg, 16), db = sw_desc<QK_SW>(sKn, 16);
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
        constexpr int K16_PER_CHUNK = QK_SW / 32;
        const int chunk = kk / K16_PER_CHUNK, inner = (kk % K16_PER_CHUNK) * 32;
        wgmma_ss(s, desc_plus(da, chunk * BLOCK_M * QK_SW + inner), desc_plus(db, chunk * BLOCK_N * QK_SW + inner), kk > 0);
    }
}

// acc += P V for one key block, P from registers (issued, not waited for).
__device__ __forceinline__ void issue_pv(float (&acc)[VT * 4], const u32 (&p)[NT * 2], const unsigned char* sVn) {
    const unsigned long long db = sw_desc<V_SW>(sVn, BLOCK_N * V_SW);
#pragma unroll
    for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
        const u32 a[4] = {p[4 * kk], p[4 * kk + 1], p[4 * kk + 2], p[4 * kk + 3]};
        wgmma_rs(acc, a, desc_plus(db, kk * 16 * V_SW));
    }
}

// ---- softmax -------------------------------------------------------------------------------------------

// Scores outside row i + 8 r's visible keys selected out (-inf).
__device__ __forceinline__ void mask_row(float (&s)[NT * 4], int r, const Visibility<int>& vis, int i, int n0, int t) {
    int lo, hi;
    vis.row_keys(i + 8 * r, lo, hi);
    lo -= n0 + 2 * t;  // compared with the column offsets nt * 8 + c below
    hi -= n0 + 2 * t;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c)
            if (nt * 8 + c < lo || nt * 8 + c >= hi) s[nt * 4 + 2 * r + c] = -CUSDPA_INF;
}

// The maxima of this thread's rows over the block's masked scores, across the row's four threads: both rows at
// once, each a tree (depth log2 NT + 1 where a chain is NT + 1 deep), their shuffles in flight together (one
// branch masks both rows, where masking each row in turn put a branch between the two rows' reductions and
// made them serial). fmaxf skips NaN and is exact, so any order of the reduction gives the same maxima (a NaN score
// poisons its row through its p = exp2(NaN) instead).
__device__ __forceinline__ void row_maxima(float (&s)[NT * 4], float (&mx)[2], const Visibility<int>& vis, bool full,
                                           int i, int n0, int t) {
    if (!full) {
#pragma unroll
        for (int r = 0; r < 2; ++r) mask_row(s, r, vis, i, n0, t);
    }
    float v[2][NT];
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) v[r][nt] = fmaxf(s[nt * 4 + 2 * r], s[nt * 4 + 2 * r + 1]);
#pragma unroll
    for (int w = 1; w < NT; w *= 2)
#pragma unroll
        for (int k = 0; k + w < NT; k += 2 * w)
#pragma unroll
            for (int r = 0; r < 2; ++r) v[r][k] = fmaxf(v[r][k], v[r][k + w]);
#pragma unroll
    for (int lane_mask = 1; lane_mask <= 2; lane_mask *= 2) {
        float other[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) other[r] = __shfl_xor_sync(0xffffffffu, v[r][0], lane_mask);
#pragma unroll
        for (int r = 0; r < 2; ++r) v[r][0] = fmaxf(v[r][0], other[r]);
    }
    mx[0] = v[0][0];
    mx[1] = v[1][0];
}

// Online softmax of one key block for this thread's rows i (g) and i + 8: masks the scores, moves the row
// maxima m_i, rescales l_i, and turns the scores into unnormalised probabilities in place (l_i sums them,
// before dropout). alpha[r] is the factor the output accumulated so far needs; the return value says
// whether any row of the warp changed its max (else alpha is 1 everywhere and the rescale is skipped).
// With NATURAL the scores come scaled, in natural units (apply_mask, apply_alibi), and m_i is in those units too.
__device__ __forceinline__ bool softmax_block(float (&s)[NT * 4], float (&m_i)[2], float (&l_i)[2], float (&alpha)[2],
                                              const Visibility<int>& vis, bool full, int i, int n0, int t,
                                              float scale_log2) {
    float m_use[2];
    bool rescale = false;
    // row r's max over the block mx moves m_i[r]; alpha[r] rescales what was summed before
    auto move_max = [&](int r, float mx) {
        const float m_new = fmaxf(m_i[r], NATURAL ? mx : __fmul_rn(mx, scale_log2));
        m_use[r] = m_new == -CUSDPA_INF ? 0.f : m_new;  // a row with nothing visible yet: exp2(-inf) = 0
        alpha[r] = exp2f(NATURAL ? (m_i[r] - m_use[r]) * LOG2E : m_i[r] - m_use[r]);
        rescale |= m_new != m_i[r];
        m_i[r] = m_new;
        l_i[r] *= alpha[r];
    };
    float mx[2];
    row_maxima(s, mx, vis, full, i, n0, t);
#pragma unroll
    for (int r = 0; r < 2; ++r) move_max(r, mx[r]);
    // p = exp2(s * scale_log2 - m) as one fmaf: the max element gets exp2 of the product's rounding error,
    // within 2^-8 of 1 while |m| < 2^15. Beyond that (scores near fp32's range) the error grows with m and
    // can overflow, so the warp rounds the product alone, as the row max was, and the max element gets
    // exp2(0) = 1 exactly (flash_fwd.cu says more).
    const bool exact = __any_sync(0xffffffffu, fabsf(m_use[0]) >= 32768.f || fabsf(m_use[1]) >= 32768.f);
    auto exponentiate = [&](auto power) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const float p0 = power(s[nt * 4 + 2 * r], m_use[r]);
                const float p1 = power(s[nt * 4 + 2 * r + 1], m_use[r]);
                l_i[r] += p0 + p1;
                s[nt * 4 + 2 * r] = p0;
                s[nt * 4 + 2 * r + 1] = p1;
            }
        }
    };
    if (NATURAL)  // the difference first: the max element gets exp2(0) = 1 exactly
        exponentiate([](float x, float m) { return exp2f(__fsub_rn(x, m) * LOG2E); });
    else if (exact)
        exponentiate([scale_log2](float x, float m) { return exp2f(__fmul_rn(x, scale_log2) - m); });
    else
        exponentiate([scale_log2](float x, float m) { return exp2f(fmaf(x, scale_log2, -m)); });
    return __any_sync(0xffffffffu, rescale);
}

// P rounded to elem into the A-operand registers of P V (n8 tile nt -> p[2 nt] (row g), p[2 nt + 1]
// (row g + 8)), the dropout keep-mask applied.
__device__ __forceinline__ void round_p(const float (&s)[NT * 4], u32 (&p)[NT * 2], int i, int n0, int t,
                                        const Dropout& drop, u32 bh) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float p0 = s[nt * 4 + 2 * r], p1 = s[nt * 4 + 2 * r + 1];
#if IS_DROPOUT
            bool keep0, keep1;
            drop.keep_pair(bh, i + 8 * r, n0 + nt * 8 + 2 * t, keep0, keep1);
            p0 = keep0 ? p0 : 0.f;
            p1 = keep1 ? p1 : 0.f;
#endif
            p[nt * 2 + r] = pack2<IS_BF16>(p0, p1);
        }
    }
}

__device__ __forceinline__ void rescale_acc(float (&acc)[VT * 4], const float (&alpha)[2]) {
#pragma unroll
    for (int x = 0; x < VT * 4; ++x) acc[x] *= alpha[(x % 4) / 2];
}

#if FWD90_SPLIT_LAST
// A split tile's partial outputs merged into the first warpgroup's (acc, m_i, l_i): each part's accumulators and
// unnormalised row sums weighted by exp2 of its row max less the largest (FlashAttention's rescaling, as the
// loop rescales across blocks). `part` points at this thread's float4 of the first other part. A part whose rows
// saw nothing (max -inf) weighs 0; a row no part saw keeps max -inf and sum 0 (stored as 0, lse -inf); NaN and
// inf propagate as in the loop (exp2(inf - inf) is NaN).
__device__ __forceinline__ void merge_split(float (&acc)[VT * 4], float (&m_i)[2], float (&l_i)[2],
                                            const float4* part) {
    float4 stats[MMA_WG - 1];
#pragma unroll
    for (int w = 0; w < MMA_WG - 1; ++w) stats[w] = part[(w * (VT + 1) + VT) * 128];
    float m[2] = {m_i[0], m_i[1]}, weight[MMA_WG][2];
#pragma unroll
    for (int w = 0; w < MMA_WG - 1; ++w) {
        m[0] = fmaxf(m[0], stats[w].x);
        m[1] = fmaxf(m[1], stats[w].y);
    }
    auto weigh = [&](float mw, float mx) {
        return mw == -CUSDPA_INF ? 0.f : exp2f(NATURAL ? (mw - mx) * LOG2E : mw - mx);
    };
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        weight[0][r] = weigh(m_i[r], m[r]);
        l_i[r] *= weight[0][r];
    }
#pragma unroll
    for (int w = 0; w < MMA_WG - 1; ++w) {
        weight[w + 1][0] = weigh(stats[w].x, m[0]);
        weight[w + 1][1] = weigh(stats[w].y, m[1]);
        l_i[0] += weight[w + 1][0] * stats[w].z;
        l_i[1] += weight[w + 1][1] * stats[w].w;
    }
#pragma unroll
    for (int vt = 0; vt < VT; ++vt) {
        // (registers 4 vt .. 4 vt + 3: columns of row g, then of row g + 8)
        float4 x = make_float4(acc[vt * 4] * weight[0][0], acc[vt * 4 + 1] * weight[0][0],
                               acc[vt * 4 + 2] * weight[0][1], acc[vt * 4 + 3] * weight[0][1]);
#pragma unroll
        for (int w = 0; w < MMA_WG - 1; ++w) {
            const float4 y = part[(w * (VT + 1) + vt) * 128];
            x.x += weight[w + 1][0] * y.x;
            x.y += weight[w + 1][0] * y.y;
            x.z += weight[w + 1][1] * y.z;
            x.w += weight[w + 1][1] * y.w;
        }
        acc[vt * 4] = x.x;
        acc[vt * 4 + 1] = x.y;
        acc[vt * 4 + 2] = x.z;
        acc[vt * 4 + 3] = x.w;
    }
    m_i[0] = m[0];
    m_i[1] = m[1];
}
#endif

// ---- attn_mask -----------------------------------------------------------------------------------------
#if ATTN_MASK

// A mask pair's value where a key is past S (its score is selected out by the visibility rule already):
// attend / add 0, so nothing turns that -inf into NaN.
__device__ __forceinline__ mask_pair_t mask_pair(const mask_t* row, int c, int S) {
#if ATTN_MASK == 1
    return c + 1 < S ? *reinterpret_cast<const mask_pair_t*>(row + c)
                     : static_cast<mask_pair_t>(0x0100u | (c < S ? row[c] : 1u));
#else
    if (c + 1 < S) return *reinterpret_cast<const mask_pair_t*>(row + c);
    mask_pair_t x;
    x.x = c < S ? row[c] : mask_t(0.f);
    x.y = mask_t(0.f);
    return x;
#endif
}

// The mask elements of this thread's scores of one key block (first key n0): rows i and i + 8 (row0 and
// row1 point at them, clamped into the mask), keys n0 + 8 nt + 2 t and the next. Loaded a block ahead, as
// soon as the current block's are applied: an L2 read takes longer than a small head dim's S = Q K^T, and
// the softmax in between covers it.
__device__ __forceinline__ void load_mask(mask_pair_t (&mk)[NT * 2], const mask_t* row0, const mask_t* row1, int n0,
                                          int t, int S) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        mk[nt * 2] = mask_pair(row0, n0 + nt * 8 + 2 * t, S);
        mk[nt * 2 + 1] = mask_pair(row1, n0 + nt * 8 + 2 * t, S);
    }
}

// Scores with the mask applied: a bool mask's False -> -inf; a float mask: s * scale + mask (natural units).
// HIDE (a float mask's tile that holds -inf at a visible pair, the summary's bit 8): -inf where the mask is
// -inf whatever s is, so a NaN or inf score there (a non-finite query row that sees no key, a non-finite key
// other rows see) stays hidden, as in the reference. Only such tiles pay the compare and select: on every
// tile they cost a quarter of a float-masked forward's speed (the consumers spilled).
template <bool HIDE>
__device__ __forceinline__ void apply_mask(float (&s)[NT * 4], const mask_pair_t (&mk)[NT * 2], float scale) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float& s0 = s[nt * 4 + 2 * r];
            float& s1 = s[nt * 4 + 2 * r + 1];
            const mask_pair_t m = mk[nt * 2 + r];
#if ATTN_MASK == 1
            s0 = (m & 0xffu) ? s0 : -CUSDPA_INF;
            s1 = (m & 0xff00u) ? s1 : -CUSDPA_INF;
#else
#if ATTN_MASK == 4
            const float2 f = m;
#elif ATTN_MASK == 2
            const float2 f = __half22float2(m);
#else
            const float2 f = __bfloat1622float2(m);
#endif
            s0 = HIDE && f.x == -CUSDPA_INF ? f.x : SOFTCAP ? s0 + f.x : fmaf(s0, scale, f.x);  // soft-capped: scaled
            s1 = HIDE && f.y == -CUSDPA_INF ? f.y : SOFTCAP ? s1 + f.y : fmaf(s1, scale, f.y);
#endif
        }
    }
}
#endif

// ---- logit soft-capping --------------------------------------------------------------------------------
#if SOFTCAP
// softcap * tanh(s * scale / softcap), the scores' first transformation (then ALiBi, then a float mask),
// in natural units; tanh as 1 - 2 / (e^2x + 1) with the MUFU exponential (exact to fp32's last bits where
// it matters: tanh.approx's 2^-11 would move a score of 20 by 0.01), +-1 where e^2x overflows or vanishes.
// `k` = 2 log2(e) scale / softcap.
__device__ __forceinline__ float soft_cap(float x, float k, float softcap) {
    return softcap * (1.f - 2.f / (exp2f(x * k) + 1.f));
}
#endif

// ---- ALiBi ---------------------------------------------------------------------------------------------
#if ALIBI
// FlashAttention's ALiBi: -slope * |i + S - L - j| added to score (i, j) of the slice, in natural units,
// aligned bottom-right whatever the causal alignment (`shift` = S - L), after the scaled product and before
// a float mask (whose apply_mask has already scaled the scores: then the bias is added alone).
struct Alibi {
    float slope;
    int shift;
    // this thread's scores: rows i (r = 0) and i + 8, keys j0 + nt * 8 + c
    __device__ __forceinline__ void apply(float (&s)[NT * 4], int i, int j0, float scale) const {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int r = 0; r < 2; ++r)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    float& x = s[nt * 4 + 2 * r + c];
                    const float bias = -slope * static_cast<float>(abs(i + 8 * r + shift - (j0 + nt * 8 + c)));
                    x = FLOAT_MASK || SOFTCAP ? x + bias : fmaf(x, scale, bias);
                }
    }
};
#endif

// ---- tiles ---------------------------------------------------------------------------------------------

// What producer and consumers both derive from a tile index: its slice, query rows and key blocks.
struct Tile {
    Slice slice;
    int m0;              // first query row
    int n_begin, n_end;  // key blocks [n_begin, n_end); empty when no query row of the tile sees a key
    int j_lo, j_hi;      // keys [j_lo, j_hi) seen by some query of the slice (the rest of a V block is zeroed)
    bool live;           // false when the tile starts past the slice's queries (a short packed sequence)
};

// The tile of query block m_block of `slice`: its key blocks and the keys its slice sees.
__device__ __forceinline__ Tile tile_of(const Slice& slice, int m_block) {
    Tile tile{slice, m_block * BLOCK_M, 0, 0, 0, 0, false};
    if (tile.m0 >= tile.slice.L) return tile;
    tile.live = true;
    int lo, hi;
    tile.slice.vis.key_range(tile.m0, min(tile.m0 + BLOCK_M, tile.slice.L), lo, hi);
    if (lo < hi) {
        tile.n_begin = lo / BLOCK_N;
        tile.n_end = (hi + BLOCK_N - 1) / BLOCK_N;
    }
    tile.slice.vis.key_range(0, tile.slice.L, tile.j_lo, tile.j_hi);
    return tile;
}

// n / d for 0 <= n < 2^31 by a multiply-high and a shift (Granlund and Montgomery's method): m = 2^p / d
// rounded up with p = 31 + ceil(log2 d), then n / d = floor(n m / 2^p), exact for every such n since the
// rounding adds less than n / 2^p < 1 / d to n / d. Set up once per kernel; tile_at's divisions by values
// known only at run time are each a chain of ~25 dependent instructions as `/`, every tile, on the producer's
// and the consumers' paths (the tile's setup was 4-6% of E = 64's consumer clocks).
struct FastDiv {
    int d = 1;
    u32 mul = 0, shift = 0;
    FastDiv() = default;
    __device__ __forceinline__ explicit FastDiv(int divisor) : d(divisor) {
        if (d > 1) {
            const u32 p = 31 + (32 - __clz(d - 1));  // 31 + ceil(log2 d)
            mul = static_cast<u32>(((1ull << p) + d - 1) / static_cast<unsigned long long>(d));
            shift = p - 32;
        }
    }
    __device__ __forceinline__ int div(int n) const {
        return d > 1 ? static_cast<int>(__umulhi(static_cast<u32>(n), mul) >> shift) : n;
    }
    // lane `from`'s FastDiv (the whole warp calls it)
    __device__ __forceinline__ FastDiv of_lane(int from) const {
        FastDiv x;
        x.d = __shfl_sync(0xffffffffu, d, from);
        x.mul = __shfl_sync(0xffffffffu, mul, from);
        x.shift = __shfl_sync(0xffffffffu, shift, from);
        return x;
    }
};

// tile_at's divisors, set up once: query blocks per chunk of heads, heads per chunk (and in the last chunk,
// which may hold fewer), query heads, and query heads per kv head. Each of the first five lanes of a warp
// finds one reciprocal (a 64-bit division, side by side), which the others then read.
struct TileDivisors {
    FastDiv per_chunk, chunk_heads, last_heads, hq, group;
    __device__ __forceinline__ TileDivisors(int num_m, int chunk_heads_, int BH, int Hq, int group_) {
        const int lane = threadIdx.x % 32;
        const int last = BH - (BH - 1) / chunk_heads_ * chunk_heads_;
        const FastDiv mine(lane == 0 ? chunk_heads_ * num_m : lane == 1 ? chunk_heads_ : lane == 2 ? last
                           : lane == 3 ? Hq : group_);
        per_chunk = mine.of_lane(0);
        chunk_heads = mine.of_lane(1);
        last_heads = mine.of_lane(2);
        hq = mine.of_lane(3);
        group = mine.of_lane(4);
    }
};

// Tile t of the order described at the top, decoded by multiplies, not divisions.
// With clusters, num_m counts units of CLUSTER neighbouring query blocks and `rank` picks this CTA's block of the unit.
__device__ __forceinline__ Tile tile_at(int t, const TileDivisors& dv, int num_m, int BH, const int* cu_q,
                                        const int* cu_k, int L, int S, int left, int right, int lower_right, int rank) {
    const int chunk = dv.per_chunk.div(t), rem = t - chunk * dv.per_chunk.d;
    const int heads = min(dv.chunk_heads.d, BH - chunk * dv.chunk_heads.d);
    const FastDiv by_heads = heads == dv.chunk_heads.d ? dv.chunk_heads : dv.last_heads;  // (a copy: registers)
    const int q = by_heads.div(rem);
    const int bh = chunk * dv.chunk_heads.d + rem - q * heads;
    const int b = dv.hq.div(bh), h = bh - b * dv.hq.d;
    return tile_of(Slice::query_head_of(b, h, dv.group.div(h), bh, cu_q, cu_k, L, S, left, right, lower_right),
                   (num_m - 1 - q) * CLUSTER + rank);
}

// The tiles of CTA blockIdx.x in turn. With FWD90_SCHEDULE, entries schedule[b] .. schedule[b + 1] of the host's
// list, which follows the gridDim.x + 1 offsets from a 16-byte boundary: each tile decoded, int4 (batch, query head,
// kv head, query block). (Where it held tile indices, tile_at's chain of divisions and the schedule's load ran at
// every tile's start on the producer's and each consumer warp's path: a tile's setup took 6.7% of a consumer's
// clocks at causal E = 64 L = 1024, now 5.4%; the divisors' registers spilled. The list is read-only memory read
// at one address a warp: the compiler keeps its entries in uniform registers, as it kept tile_at's results.)
// Without, every gridDim.x-th tile from blockIdx.x (with clusters: the units of cluster blockIdx.x / CLUSTER, every
// gridDim.x / CLUSTER-th, the same for its CTAs), decoded by tile_at. The next tile's entry is loaded while this one
// runs.
struct TileDeal {
#if FWD90_SCHEDULE
    const int4* list;
    int4 ahead;
    int k, end;
    __device__ __forceinline__ TileDeal(const int* schedule, int num_tiles)
        : list(reinterpret_cast<const int4*>(schedule + (gridDim.x + 4) / 4 * 4)), ahead{},
          k(schedule[blockIdx.x]), end(schedule[blockIdx.x + 1]) {
        (void)num_tiles;
        if (k < end) ahead = __ldg(list + k);
    }
    __device__ __forceinline__ int4 next() {
        const int4 t = ahead;
        if (++k < end) ahead = __ldg(list + k);
        return t;
    }
#else
    int k, end, step;
    __device__ __forceinline__ TileDeal(const int* schedule, int num_tiles)
        : k(static_cast<int>(blockIdx.x) / CLUSTER), end(num_tiles), step(static_cast<int>(gridDim.x) / CLUSTER) {
        (void)schedule;
    }
    __device__ __forceinline__ int next() {
        const int t = k;
        k += step;
        return t;
    }
#endif
    __device__ __forceinline__ bool more() const { return k < end; }
};

// The dynamic deal of a masked forward. A static deal of a mask's tiles (each visiting the blocks the mask
// shows, ~4 of 32 at random for a 90%-empty mask) left the busiest CTA 1.13-1.24x the average work; taking
// tiles as CTAs finish them leaves it about 1.04x. The producer's lane 0 takes tile gridDim.x + x from
// `taken[0]` (x its atomicAdd's old value: the first wave is blockIdx.x) a tile ahead of its use, and hands
// each tile to the consumers through a ring of two slots in shared memory (`full`: a slot written;
// `empty`: every consumer warp has read it); a tile past the last one ends both sides. The counter lives
// beside the mask's block summary (one per mask and stream: kernels running the same summary are ordered),
// zeroed by the summary pass (without a mask, `blocks` is a zeroed counter of the call's own); each CTA makes
// exactly one atomicAdd past the end, and the last CTA to make it (counted in `taken[1]`) sets both words
// back to 0 for the next launch, which runs after this one.
struct TileQueue {
    int* taken;
    int* slot;
    unsigned long long* full;
    unsigned long long* empty;
    u32 k = 0;  // tiles put or got so far
    // producer, lane 0: tile t into the next slot
    __device__ __forceinline__ void put(int t) {
        mbar_wait(empty + (k & 1), ((k >> 1) & 1) ^ 1);
        slot[k & 1] = t;
        mbar_arrive(full + (k & 1));
        ++k;
    }
    // producer, lane 0: the tile after the first wave's (an atomicAdd on the counter)
    __device__ __forceinline__ int take() const { return static_cast<int>(gridDim.x) + atomicAdd(taken, 1); }
    // producer, lane 0, after its take past the last tile: the last CTA resets the counter
    __device__ __forceinline__ void finish() const {
        __threadfence();
        if (atomicAdd(taken + 1, 1) == static_cast<int>(gridDim.x) - 1) {
            taken[0] = 0;
            taken[1] = 0;
        }
    }
    // a consumer warp: the next tile (num_tiles or more: none left). Lane 0 alone reads the slot and hands it
    // to the warp before it frees the slot, so the read precedes the arrival in one thread's order (where every
    // lane read and a __syncwarp ordered them, compute-sanitizer's racecheck saw a write-after-read hazard)
    __device__ __forceinline__ int get() {
        mbar_wait_warp(full + (k & 1), (k >> 1) & 1);
        int t = 0;
        if (threadIdx.x % 32 == 0) {
            t = *static_cast<volatile int*>(slot + (k & 1));
            mbar_arrive(empty + (k & 1));
        }
        ++k;
        return __shfl_sync(0xffffffffu, t, 0);
    }
};

// The key blocks a tile visits: those of [n_begin, n_end), and with an attn_mask its summary (`blocks`, made
// by the host, kernels_cuda/mask_summary.cu: per batch, head, query block and key block, 0 = nothing
// attended, 1 = some, 2 = every visible pair; bit 4: a key of the block that no row of the tile attends; bit
// 8: a float mask's -inf at a visible pair) says which to skip and where the mask elements must be read
// (`partial`, `hides`), and the producer which V blocks may hold keys no query of the slice sees (`holes`).
// Producer and consumers walk the same blocks, so the K/V ring stays in step. Without a mask, every block.
//
// A warp reads the summary 32 blocks at a time, a byte a lane in one load, and keeps which of them it
// visits as a bit mask (BallotWalk): skipping blocks is bit arithmetic. Read a byte per block as the scan went, the
// skipped blocks were a chain of dependent loads on the producer's and the consumers' paths, about 0.6-1 us
// each on the H200: most of a sparse mask's time (a 90%-empty mask's forward took 606 us for 13% of the
// unmasked 840 us of work). Every lane of the warp calls `from` and `summary`.
struct KeyBlocks {
#if ATTN_MASK
    const signed char* row;  // the tile's summary over key blocks
    BallotWalk walk;         // over the visited blocks
    int byte;                // the summary byte of the block this lane evaluated last (block walk.chunk + lane)
#endif
    int n_end;
    // the first block to visit at or after n (n_end: none)
    __device__ __forceinline__ int from(int n) {
#if ATTN_MASK
        return walk.from(n, n_end, [&](int m) {
            byte = m < n_end ? row[m] : 0;
            return (byte & 3) != 0;
        });
#else
        return n;
#endif
    }
    // the summary byte of block n, a block `from` returned last (n_end: 0, which reads as visited nowhere)
    __device__ __forceinline__ int summary(int n) const {
#if ATTN_MASK
        const int x = __shfl_sync(0xffffffffu, byte, n & 31);
        return n < n_end ? x : 0;
#else
        return 0 * n;
#endif
    }
    // what a summary byte says: mask elements to read; a float mask's -inf at a visible pair (apply_mask's
    // HIDE); keys no row of the tile attends
    __device__ __forceinline__ static bool partial(int x) { return (x & 3) == 1; }
    __device__ __forceinline__ static bool hides(int x) { return (x & 8) != 0; }
    __device__ __forceinline__ static bool holes(int x) { return (x & 4) != 0; }
};

__device__ __forceinline__ KeyBlocks key_blocks(const Tile& tile, const signed char* blocks, long long bs_b,
                                                long long bs_h, long long bs_m) {
#if ATTN_MASK
    const signed char* row = blocks + tile.slice.b * bs_b + tile.slice.h * bs_h + (tile.m0 / BLOCK_M) * bs_m;
    return KeyBlocks{row, BallotWalk{}, 0, tile.n_end};
#else
    (void)blocks, (void)bs_b, (void)bs_h, (void)bs_m;
    return KeyBlocks{tile.n_end};
#endif
}

#if FWD90_CLUSTER > 1
#define FWD90_CLUSTER_DIMS __cluster_dims__(FWD90_CLUSTER, 1, 1)
#else
#define FWD90_CLUSTER_DIMS
#endif
extern "C" __global__ void __launch_bounds__(NTHREADS, 1) FWD90_CLUSTER_DIMS
flash_fwd_sm90(const __grid_constant__ TmaMap tm_q, const __grid_constant__ TmaMap tm_k,
               const __grid_constant__ TmaMap tm_v,
#if FWD90_TMA_STORE
               const __grid_constant__ TmaMap tm_o, int o_hm, int o_bm,
#endif
               elem_t* __restrict__ o, float* __restrict__ lse,
               const int* __restrict__ cu_q, const int* __restrict__ cu_k, int L, int S, int Hq, int group,
               int q_hm, int q_bm, int k_hm, int k_bm, int v_hm, int v_bm, long long o_sb, long long o_sh,
               long long o_sm, long long lse_sb, long long lse_sh, float scale_log2, int left, int right,
               int lower_right, unsigned int seed_lo, unsigned int seed_hi, unsigned int offset,
               unsigned int threshold, float rp_dropout, int BH, int num_m, int chunk_heads,
               const int* __restrict__ schedule, const mask_t* __restrict__ mask, long long m_sb, long long m_sh,
               long long m_sm, const unsigned char* __restrict__ seen, long long sk_b, long long sk_h,
               const signed char* __restrict__ blocks, long long bs_b, long long bs_h, long long bs_m,
               long long taken_at, const float* __restrict__ slopes, long long slopes_b, float softcap) {
    PhaseClock ph;  // (with CUSDPA_PHASES: phases.cuh)
    extern __shared__ __align__(1024) unsigned char smem[];
    unsigned char* sQ = smem;  // every size is a multiple of 1024: each tile keeps the swizzle alignment
    unsigned char* sK = sQ + SQ_BYTES;
    unsigned char* sV = sK + STAGES * SK_BYTES;
    unsigned char* sO = sV + STAGES * SV_BYTES;
    float4* sSplit = reinterpret_cast<float4*>(sO + SO_BYTES);  // (FWD90_SPLIT_LAST)
    unsigned long long* bars = reinterpret_cast<unsigned long long*>(smem + SMEM_TILES);
    unsigned long long* q_full = bars;
    unsigned long long* q_empty = bars + 1;
    unsigned long long* k_full = bars + 2;
    unsigned long long* k_empty = k_full + STAGES;
    unsigned long long* v_full = k_empty + STAGES;
    unsigned long long* v_empty = v_full + STAGES;
    unsigned long long* v_staged = v_empty + STAGES;  // the producer's own: a V block it must zero rows of
#if FWD90_QUEUE
    TileQueue queue{reinterpret_cast<int*>(const_cast<signed char*>(blocks) + taken_at),
                    reinterpret_cast<int*>(v_staged + 5), v_staged + 1, v_staged + 3};
#else
    (void)taken_at;
#endif
    static_assert(FWD90_QUEUE || !ATTN_MASK, "a masked forward takes its tiles from the queue");

    const int warp = warp_index(), lane = threadIdx.x % 32, wg = warp / 4;
    const int num_units = num_m / CLUSTER;  // query blocks of a head as the CTAs deal them (the host: a multiple)
    const int num_tiles = BH * num_units;
    const int rank = CLUSTER > 1 ? static_cast<int>(cluster_rank()) : 0;
#if FWD90_SCHEDULE
    (void)chunk_heads;
    auto decode_tile = [&](int4 e) {  // an entry of the host's schedule (no clusters: rank 0)
        return tile_of(Slice::query_head_of(e.x, e.y, e.z, e.x * Hq + e.y, cu_q, cu_k, L, S, left, right, lower_right),
                       e.w);
    };
#else
    const TileDivisors divisors(num_units, chunk_heads, BH, Hq, group);
    auto decode_tile = [&](int t) {
        return tile_at(t, divisors, num_units, BH, cu_q, cu_k, L, S, left, right, lower_right, rank);
    };
#endif

    if (threadIdx.x == 0) {
        mbar_init(q_full, 1);
        mbar_init(q_empty, CONSUMER_WARPS);
        for (int st = 0; st < STAGES; ++st) {
            mbar_init(k_full + st, 1);
            mbar_init(v_full + st, 1);
            mbar_init(k_empty + st, CONSUMER_WARPS * CLUSTER);  // the consumer warps of every CTA of the cluster
            mbar_init(v_empty + st, CONSUMER_WARPS * CLUSTER);
        }
        mbar_init(v_staged, 1);
#if FWD90_QUEUE
        for (int x = 0; x < 2; ++x) {
            mbar_init(queue.full + x, 1);
            mbar_init(queue.empty + x, CONSUMER_WARPS);
        }
#endif
        mbar_init_fence();
    }
    if (CLUSTER > 1)
        cluster_sync();  // (the other CTA's barriers initialised before any arrival or copy reaches them)
    else
        __syncthreads();

    if (wg == 0) {  // ---- producer ----
        setmaxnreg_dec<LOAD_REGS>();
        if (warp != 0) return;
        if (lane == 0) {
            tma_prefetch(tm_q);
            tma_prefetch(tm_k);
            tma_prefetch(tm_v);
#if FWD90_TMA_STORE
            tma_prefetch(tm_o);
#endif
        }
        ph.to(PH_START);
        u32 it = 0, q_phase = 0, staged_phase = 0;
#if FWD90_QUEUE
        int ahead = blockIdx.x;  // the tile the producer puts next (lane 0's)
        for (;;) {
            int t = ahead;
            if (lane == 0) {
                queue.put(t);
                if (t < num_tiles) ahead = queue.take();  // in flight while this tile loads
                else queue.finish();
            }
            t = __shfl_sync(0xffffffffu, t, 0);
            if (t >= num_tiles) break;
#else
        for (TileDeal deal(schedule, num_tiles); deal.more();) {
            const auto t = deal.next();
#endif
            const Tile tile = decode_tile(t);
            if (!tile.live) continue;
            KeyBlocks kb = key_blocks(tile, blocks, bs_b, bs_h, bs_m);
            const int first = kb.from(tile.n_begin);
            if (first >= tile.n_end) continue;
            const Slice& sl = tile.slice;
            const UnseenKeys unseen{ATTN_MASK ? seen + sl.b * sk_b + sl.h * sk_h : nullptr, 0, 1, sl.S};
            if (lane == 0) {
                ph.to(PH_TILE);
                mbar_wait(q_empty, q_phase ^ 1);
                ph.to(PH_WAIT_Q);
                tma_load_tile<BLOCK_M, HEAD_DIM, QK_SW>(sQ, tm_q, q_full, sl.start_q + tile.m0, sl.h * q_hm, sl.b * q_bm);
                ph.to(PH_ISSUE);
                ph.count(PH_TILES);
            }
            q_phase ^= 1;
            for (int n = first; n < tile.n_end; n = kb.from(n + 1), ++it) {
                const int st = it % STAGES;
                const u32 phase = (it / STAGES) & 1;
                const int j0 = n * BLOCK_N, row = sl.start_k + j0;
                unsigned char* sVs = sV + st * SV_BYTES;
                if (lane == 0) {
                    mbar_wait(k_empty + st, phase ^ 1);
                    ph.to(PH_WAIT_K);
                    tma_load_tile<BLOCK_N, HEAD_DIM, QK_SW, CLUSTER>(sK + st * SK_BYTES, tm_k, k_full + st, row,
                                                                     sl.kvh * k_hm, sl.b * k_bm, rank);
                    ph.to(PH_ISSUE);
                    ph.count(PH_BLOCKS);
                }
                // Rows of this block past the slice's visible keys that the tensor holds (a packed tensor
                // holds the next sequence), and keys the attn_mask lets no query row see, are zeroed before
                // the consumers hear of the block; rows past a dense tensor's end arrive as zeros.
                const int zero_end = sl.packed ? j0 + BLOCK_N : min(j0 + BLOCK_N, sl.S);
                const bool block_unseen = KeyBlocks::holes(kb.summary(n));
                // (never with clusters: the host takes them only where every query sees every key)
                const bool dirty = CLUSTER == 1 && (j0 < tile.j_lo || zero_end > tile.j_hi || block_unseen);
                // Only lane 0 waits on the ring's barriers. The other lanes skip its Q and K waits, so, had they
                // spun on v_empty too, they would drift apart from it by whole phases, which a parity wait
                // cannot tell apart: with a mask whose tiles each visit one key block they hung (H200). They
                // join lane 0 on a dirty block only, at v_staged, which the copy completes after lane 0's wait.
                if (lane == 0) {
                    mbar_wait(v_empty + st, phase ^ 1);
                    ph.to(PH_WAIT_V);
                    tma_load_tile<BLOCK_N, HEAD_DIM_V, V_SW, CLUSTER>(sVs, tm_v, dirty ? v_staged : v_full + st, row,
                                                                      sl.kvh * v_hm, sl.b * v_bm, rank);
                    ph.to(PH_ISSUE);
                }
                if (!dirty) continue;
                mbar_wait(v_staged, staged_phase);
                staged_phase ^= 1;
                const int lo_rows = max(0, min(tile.j_lo - j0, BLOCK_N));  // rows [0, lo_rows) and [hi_row, BLOCK_N)
                const int hi_row = max(lo_rows, min(tile.j_hi - j0, BLOCK_N));
                constexpr int ROW_CHUNKS = HEAD_DIM_V * 2 / 16;  // 16-byte pieces of one row, over all column chunks
                for (int x = lane; x < BLOCK_N * ROW_CHUNKS; x += 32) {
                    const int r = x / ROW_CHUNKS, c = (x % ROW_CHUNKS) / (V_SW / 16), ch = x % (V_SW / 16);
                    if (r < lo_rows || r >= hi_row || (block_unseen && j0 + r < sl.S && unseen.at(j0 + r)))
                        *reinterpret_cast<uint4*>(sVs + c * BLOCK_N * V_SW + r * V_SW + ch * 16) = make_uint4(0, 0, 0, 0);
                }
                fence_proxy_async();
                __syncwarp();
                if (lane == 0) {
                    mbar_arrive(v_full + st);
                    ph.to(PH_ZERO);
                }
            }
        }
        return;
    }

    // ---- consumers ----
    setmaxnreg_inc<MMA_REGS>();
    const int cw = wg - 1;  // consumer index: rows 64 cw .. 64 cw + 63 of each tile
    const int g = lane / 4, t4 = lane % 4;
    const unsigned char* sQwg = sQ + cw * 64 * QK_SW;
    const Dropout drop{seed_lo, seed_hi, offset, threshold};
#if ATTN_MASK || ALIBI || SOFTCAP
    const float scale = scale_log2 * LN2;  // a float mask and ALiBi are added to the scores scaled by this
#endif
#if SOFTCAP
    const float cap_k = 2.f * LOG2E * scale / softcap;
#endif
    // Ping-pong: consumer cw issues after barrier 1 + cw opens and then opens the next consumer's. The
    // first consumer's first turn is free; the last consumer's last opening is absorbed at the end.
    bool first_turn = cw == 0, issued = false;
    auto turn_begin = [&] {
        if (FWD90_PINGPONG && !first_turn) named_sync<256>(1 + cw);
        first_turn = false;
    };
    auto turn_end = [&] {
        if (FWD90_PINGPONG) named_arrive<256>(1 + (cw + 1) % MMA_WG);
        issued = true;
    };
    auto release = [&](unsigned long long* bar) {
        if (lane == 0) mbar_arrive(bar);
    };
    // a K or V buffer: released in every CTA of the cluster, whose producers all write into it
    auto release_kv = [&](unsigned long long* bar) {
        if (lane == 0) {
            if (CLUSTER == 1) {
                mbar_arrive(bar);
            } else {
#pragma unroll
                for (int c = 0; c < CLUSTER; ++c) mbar_arrive_cta(bar, c);
            }
        }
    };
    u32 it = 0, q_phase = 0;
#if FWD90_SPLIT_LAST
    bool split_handed = false;  // this warpgroup (not the first) handed a split tile over, not yet known read
#endif
#if FWD90_SKIP_IDLE
    // A warpgroup whose rows all lie past the slice's queries (the last query block of a length that is no
    // multiple of BLOCK_M) walks the tile's key blocks from block n keeping the pipeline's protocol -- each
    // buffer waited for (so that its release counts towards the phase it belongs to), released, and its
    // ping-pong turns taken -- and computes nothing. Its own loop, not the compute loop with its products
    // skipped: ptxas serialises every wgmma where a path may read accumulators between issue and wait.
    auto walk_idle = [&](KeyBlocks& kb, int n, int n_end) {
        mbar_wait_warp(q_full, q_phase);
        q_phase ^= 1;
        u32 st = it % STAGES, phase = (it / STAGES) & 1;
        mbar_wait_warp(k_full + st, phase);
        turn_begin();  // S of the first block
        turn_end();
        for (;;) {
            const int next = kb.from(n + 1);
            release_kv(k_empty + st);
            if (next >= n_end) {
                release(q_empty);
                break;
            }
            n = next;
            const u32 prev = st, prev_phase = phase;
            ++it;
            st = it % STAGES;
            phase = (it / STAGES) & 1;
            mbar_wait_warp(k_full + st, phase);
            mbar_wait_warp(v_full + prev, prev_phase);
            turn_begin();  // S of block n with P V of the block before
            turn_end();
            release_kv(v_empty + prev);
        }
        mbar_wait_warp(v_full + st, phase);
        turn_begin();  // P V of the last block
        turn_end();
        release_kv(v_empty + st);
        ++it;
    };
#endif
    ph.to(PH_START);
#if FWD90_QUEUE
    for (int t = queue.get(); t < num_tiles; t = queue.get()) {
#else
    for (TileDeal deal(schedule, num_tiles); deal.more();) {
        const auto t = deal.next();
#endif
        const Tile tile = decode_tile(t);
        if (!tile.live) continue;
        const Slice& sl = tile.slice;
        const Visibility<int>& vis = sl.vis;
#if FWD90_SPLIT_LAST
        const bool split = tile.m0 + 64 >= sl.L;  // the tile's rows fill the first warpgroup only: split_tile
#else
        constexpr bool split = false;
#endif
        const int mw = tile.m0 + (split ? 0 : cw * 64);   // this warpgroup's first row
        const int i = mw + (warp % 4) * 16 + g;  // this thread's rows are i and i + 8
        elem_t* ob = sl.query_rows(o, o_sb, o_sh, o_sm);
        float* lseb = lse + sl.stats_offset(lse_sb, lse_sh);
#if ALIBI
        const Alibi alibi{slopes[sl.b * slopes_b + sl.h], sl.S - sl.L};
#endif
#if ATTN_MASK
        const mask_t* mask_b = mask + sl.b * m_sb + sl.h * m_sh;
        const mask_t* mask_r0 = mask_b + min(i, sl.L - 1) * m_sm;  // rows past L: any row, never stored
        const mask_t* mask_r1 = mask_b + min(i + 8, sl.L - 1) * m_sm;
        mask_pair_t mk[NT * 2];
#endif
        KeyBlocks kb = key_blocks(tile, blocks, bs_b, bs_h, bs_m);
        int n = kb.from(tile.n_begin);
        if (n >= tile.n_end) {  // no query of the tile sees a key: out 0, lse -inf
            if (split && cw > 0) continue;  // (the first warpgroup's rows: its to store)
            for (int x = threadIdx.x - 128 * wg; x < 64 * (HEAD_DIM_V / 8); x += 128) {
                const int row = mw + x / (HEAD_DIM_V / 8), ch = x % (HEAD_DIM_V / 8);
                if (row < sl.L) *reinterpret_cast<uint4*>(ob + row * o_sm + ch * 8) = make_uint4(0, 0, 0, 0);
            }
            for (int r = threadIdx.x - 128 * wg; r < 64; r += 128)
                if (mw + r < sl.L) lseb[mw + r] = -CUSDPA_INF;
            ph.to(PH_EPILOGUE);
            continue;
        }
#if FWD90_SKIP_IDLE
        if (mw >= sl.L) {  // this warpgroup's rows all lie past the queries: nothing to compute or store
            ph.to(PH_TILE);
            walk_idle(kb, n, tile.n_end);
            ph.to(PH_TURN);  // (the walk's clocks: waits for buffers and turns)
            continue;
        }
#endif

        float acc[VT * 4];
#pragma unroll
        for (int x = 0; x < VT * 4; ++x) acc[x] = 0.f;
        float m_i[2] = {-CUSDPA_INF, -CUSDPA_INF}, l_i[2] = {0.f, 0.f}, alpha[2];
        float s[NT * 4];
        u32 p[NT * 2];

        // Block n's scores as the softmax takes them: soft-capped, masked (the next block's mask elements then
        // loaded, a softmax ahead), ALiBi's bias added. `here`, `ahead`: the summary bytes of blocks n and next.
        auto modify_scores = [&](int here, int ahead, int next, int n0) {
#if SOFTCAP
#pragma unroll
            for (int x = 0; x < NT * 4; ++x) s[x] = soft_cap(s[x], cap_k, softcap);
#endif
#if ATTN_MASK
            if (KeyBlocks::partial(here)) {
                if (FLOAT_MASK && KeyBlocks::hides(here))
                    apply_mask<true>(s, mk, scale);
                else
                    apply_mask<false>(s, mk, scale);
            }
            if (KeyBlocks::partial(ahead)) load_mask(mk, mask_r0, mask_r1, next * BLOCK_N, t4, sl.S);
#endif
#if ALIBI
            alibi.apply(s, i, n0 + 2 * t4, scale);
#endif
            (void)here, (void)ahead, (void)next, (void)n0;
        };

#if FWD90_SPLIT_LAST
        if (split) {
            ph.to(PH_TILE);
            ph.count(PH_TILES);
            // Split tile: the last query block of a slice whose rows fill the first warpgroup only (1024 = 5 x 192
            // + 64 rows). Every warpgroup computes those 64 rows, each against every MMA_WG-th of the tile's key
            // blocks (block k to warpgroup k % MMA_WG), and the first merges the partial outputs (split-KV inside
            // the CTA), where one warpgroup alone would walk all of them while the others idle. A warpgroup
            // takes its blocks one at a time -- S, softmax, P V, each waited for -- and releases each buffer
            // as soon as it is done with it; another warpgroup's blocks it only waits for and releases, so
            // that every buffer's release counts towards its phase. Nothing it waits for at block k needs a
            // release at a later block, so the ring cannot deadlock whatever its depth; the warpgroups' blocks
            // overlap one another instead of a warpgroup's own. No ping-pong turns: every warpgroup skips as
            // many, so the cycle is where it was.
            mbar_wait_warp(q_full, q_phase);
            q_phase ^= 1;
            const int blocks = tile.n_end - n;  // (no attn_mask: every block of [n, n_end))
            if (cw >= blocks) release(q_empty);
            for (int k = 0; k < blocks; ++k, ++it) {
                const int st = it % STAGES;
                const u32 phase = (it / STAGES) & 1;
                mbar_wait_warp(k_full + st, phase);
                if (k % MMA_WG != cw) {
                    release_kv(k_empty + st);
                    mbar_wait_warp(v_full + st, phase);
                    release_kv(v_empty + st);
                    continue;
                }
                fence_regs(s);
                wgmma_fence();
                issue_qk(s, sQ, sK + st * SK_BYTES);
                wgmma_commit();
                wgmma_wait<0>();
                fence_regs(s);
                release_kv(k_empty + st);
                if (k + MMA_WG >= blocks) release(q_empty);  // this warpgroup's last S
                const int n0 = (n + k) * BLOCK_N;
                modify_scores(0, 0, n + k + 1, n0);
                if (softmax_block(s, m_i, l_i, alpha, vis, vis.tile_full(mw, 64, n0, BLOCK_N), i, n0, t4, scale_log2))
                    rescale_acc(acc, alpha);
                round_p(s, p, i, n0, t4, drop, sl.bh);
                mbar_wait_warp(v_full + st, phase);
                fence_regs(p);
                fence_regs(acc);
                wgmma_fence();
                issue_pv(acc, p, sV + st * SV_BYTES);
                wgmma_commit();
                wgmma_wait<0>();
                fence_regs(acc);
                release_kv(v_empty + st);
            }
            ph.to(PH_SOFTMAX);
            if (cw > 0) {  // hand the partial output over to the first warpgroup, which stores the tile
                if (split_handed) named_sync<MMA_WG * 128>(BAR_SPLIT_READ);  // (the last one read)
                float4* mine = sSplit + (cw - 1) * (VT + 1) * 128 + threadIdx.x % 128;
#pragma unroll
                for (int vt = 0; vt < VT; ++vt)
                    mine[vt * 128] = make_float4(acc[vt * 4], acc[vt * 4 + 1], acc[vt * 4 + 2], acc[vt * 4 + 3]);
                mine[VT * 128] = make_float4(m_i[0], m_i[1], l_i[0], l_i[1]);
                named_arrive<MMA_WG * 128>(BAR_SPLIT_FULL);
                split_handed = true;
                ph.to(PH_EPILOGUE);
                continue;
            }
            named_sync<MMA_WG * 128>(BAR_SPLIT_FULL);
            merge_split(acc, m_i, l_i, sSplit + threadIdx.x % 128);
            named_arrive<MMA_WG * 128>(BAR_SPLIT_READ);
        } else
#endif
        {
            // The key blocks this warpgroup computes end at n_stop. With FWD90_WG_BLOCKS at its own rows' last
            // visible key (under a causal band a tile's last blocks are seen by its later rows only: with 192-row
            // tiles and 128-key blocks every tile's first warpgroup sees none of the last block); the
            // blocks past it are walked after the products, as walk_idle walks a tile. Always the first block, so
            // that a warpgroup whose rows see nothing still stores 0 and lse -inf.
            int n_stop = tile.n_end;
#if FWD90_WG_BLOCKS
            if (mw < sl.L) {
                int lo, hi;
                vis.key_range(mw, min(mw + 64, sl.L), lo, hi);
                n_stop = min(n_stop, max((hi + BLOCK_N - 1) / BLOCK_N, n + 1));
            }
#endif

            // The first block: S, softmax, P.
            ph.to(PH_TILE);
            ph.count(PH_TILES);
            mbar_wait_warp(q_full, q_phase);
            ph.to(PH_WAIT_Q);
            q_phase ^= 1;
            int st = it % STAGES;
            u32 phase = (it / STAGES) & 1;
            mbar_wait_warp(k_full + st, phase);
            ph.to(PH_WAIT_K0);
            turn_begin();
            ph.to(PH_TURN0);
            wgmma_fence();
            issue_qk(s, sQwg, sK + st * SK_BYTES);
            wgmma_commit();
            turn_end();
            ph.to(PH_ISSUE);
            int here = kb.summary(n), n0 = n * BLOCK_N, next = kb.from(n + 1), ahead = kb.summary(next);
#if ATTN_MASK
            if (KeyBlocks::partial(here)) load_mask(mk, mask_r0, mask_r1, n0, t4, sl.S);
#endif
            wgmma_wait<0>();
            ph.to(PH_WAIT_S);
            fence_regs(s);
            release_kv(k_empty + st);
            if (next >= n_stop) release(q_empty);
            modify_scores(here, ahead, next, n0);
            softmax_block(s, m_i, l_i, alpha, vis, vis.tile_full(mw, 64, n0, BLOCK_N), i, n0, t4, scale_log2);
            round_p(s, p, i, n0, t4, drop, sl.bh);
            ph.to(PH_SOFTMAX);
            ph.count(PH_BLOCKS);

            // Block n: S of block n with P V of block n - 1, whose K and V buffers are st and prev.
            for (n = next; n < n_stop; n = next) {
                here = ahead;
                next = kb.from(n + 1);
                ahead = kb.summary(next);
                const int prev = st;
                const u32 prev_phase = phase;
                ++it;
                st = it % STAGES;
                phase = (it / STAGES) & 1;
                mbar_wait_warp(k_full + st, phase);
                ph.to(PH_WAIT_K);
                mbar_wait_warp(v_full + prev, prev_phase);
                ph.to(PH_WAIT_V);
                turn_begin();
                ph.to(PH_TURN);
                fence_regs(p);
                fence_regs(s);
                fence_regs(acc);
                wgmma_fence();
                issue_qk(s, sQwg, sK + st * SK_BYTES);
                wgmma_commit();
                issue_pv(acc, p, sV + prev * SV_BYTES);
                wgmma_commit();
                turn_end();
                ph.to(PH_ISSUE);
                n0 = n * BLOCK_N;
                wgmma_wait<1>();  // S of block n; P V of block n - 1 still runs
                ph.to(PH_WAIT_S);
                fence_regs(s);
                release_kv(k_empty + st);
                if (next >= n_stop) release(q_empty);
                modify_scores(here, ahead, next, n0);
                const bool rescale =
                    softmax_block(s, m_i, l_i, alpha, vis, vis.tile_full(mw, 64, n0, BLOCK_N), i, n0, t4, scale_log2);
                ph.to(PH_SOFTMAX);
                wgmma_wait<0>();
                ph.to(PH_WAIT_PV);
                fence_regs(acc);
                release_kv(v_empty + prev);
                if (rescale) rescale_acc(acc, alpha);
                round_p(s, p, i, n0, t4, drop, sl.bh);
                ph.to(PH_SOFTMAX);
                ph.count(PH_BLOCKS);
            }
            // P V of the last block.
            mbar_wait_warp(v_full + st, phase);
            ph.to(PH_WAIT_V);
            turn_begin();
            ph.to(PH_TURN);
            fence_regs(p);
            fence_regs(acc);
            wgmma_fence();
            issue_pv(acc, p, sV + st * SV_BYTES);
            wgmma_commit();
            turn_end();
            ph.to(PH_ISSUE);
#if FWD90_WG_BLOCKS
            // The blocks past n_stop (n is the first), counted: their turns given back at once, while this
            // warpgroup's last P V runs, so that the next warpgroup's products follow it ...
            int walked = 0;
            for (; n < tile.n_end; n = kb.from(n + 1), ++walked) {
                turn_begin();
                turn_end();
            }
#endif
            wgmma_wait<0>();
            ph.to(PH_WAIT_PV);
            fence_regs(acc);
            release_kv(v_empty + st);
            ++it;
#if FWD90_WG_BLOCKS
            // ... and their buffers each waited for (so that its release counts towards the phase it belongs to) and
            // released, only after the last V buffer read: a walked block may come to that buffer's stage, which the
            // producer refills only once every consumer warp has released it.
            for (; walked > 0; --walked, ++it) {
                const int ws = it % STAGES;
                const u32 wphase = (it / STAGES) & 1;
                mbar_wait_warp(k_full + ws, wphase);
                mbar_wait_warp(v_full + ws, wphase);
                release_kv(k_empty + ws);
                release_kv(v_empty + ws);
            }
#endif
        }

        // The rows' sums (l_i[r] from here on), their reciprocals -- with dropout's 1 / (1 - p) -- and empty rows.
        // A row that sees no key (l = 0) stores 0, not acc * 0, which is NaN after 0 * NaN of a V row another row
        // sees: its accumulators are cleared, in a warp that holds such a row only (l = NaN, from a NaN or +inf
        // score, stays NaN).
        bool empty[2];
        float inv[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            l_i[r] += __shfl_xor_sync(0xffffffffu, l_i[r], 1);
            l_i[r] += __shfl_xor_sync(0xffffffffu, l_i[r], 2);
            empty[r] = l_i[r] == 0.f;
            inv[r] = empty[r] ? 0.f : rp_dropout / l_i[r];
        }
        if (__any_sync(0xffffffffu, empty[0] || empty[1])) {
#pragma unroll
            for (int x = 0; x < VT * 4; ++x) acc[x] = empty[(x / 2) % 2] ? 0.f : acc[x];
        }
        auto o_pair = [&](int vt, int r) {  // this thread's columns vt * 8 + 2 t4 and the next of row i + 8 r
            return pack2<IS_BF16>(acc[vt * 4 + 2 * r] * inv[r], acc[vt * 4 + 2 * r + 1] * inv[r]);
        };
#if FWD90_TMA_STORE
        // O through this warpgroup's staging buffer in shared memory, then one TMA store per column chunk,
        // which runs on while the warpgroup goes on to its next tile (the store clips rows past L). The
        // buffer is written again only once the previous tile's store has read it.
        unsigned char* sOwg = sO + cw * 64 * HEAD_DIM_V * 2;
        const bool leader = threadIdx.x % 128 == 0;
        if (leader) bulk_wait<true>();
        named_sync<128>(BAR_EPILOGUE + cw);
        // Into the buffer by stmatrix, two column blocks of both rows an instruction: lane l gives row l % 8
        // (+ 8 for odd l / 8) of column block vt + l / 16. Its address is found once: the column block's 16-byte
        // chunk enters the swizzle by XOR (vt even: it leaves bit 4, l / 16's, alone).
        {
            static_assert(VT % 2 == 0, "column blocks in pairs");
            constexpr int CHUNK_COLS = V_SW / 2;
            const int q = lane / 8;
            const u32 base = smem_u32(sOwg);
            const u32 row_chunk = swizzled<V_SW>(((warp % 4) * 16 + lane % 8 + 8 * (q % 2)) * V_SW + (q / 2) * 16);
#pragma unroll
            for (int vt = 0; vt < VT; vt += 2) {
                const u32 off = (vt * 8 / CHUNK_COLS) * 64 * V_SW + (row_chunk ^ (vt % (CHUNK_COLS / 8)) * 16);
                stmatrix_x4(base + off, o_pair(vt, 0), o_pair(vt, 1), o_pair(vt + 1, 0), o_pair(vt + 1, 1));
            }
        }
        fence_proxy_async();  // the generic-proxy writes, before the async proxy reads them
        named_sync<128>(BAR_EPILOGUE + cw);
        if (leader) {
#pragma unroll
            for (int c = 0; c < HEAD_DIM_V / (V_SW / 2); ++c)
                tma_store(sOwg + c * 64 * V_SW, tm_o, c * (V_SW / 2), sl.start_q + mw, sl.h * o_hm, sl.b * o_bm);
            bulk_commit();
        }
#else
#pragma unroll
        for (int r = 0; r < 2; ++r)
            if (i + 8 * r < sl.L) {
#pragma unroll
                for (int vt = 0; vt < VT; ++vt)
                    *reinterpret_cast<u32*>(ob + (i + 8 * r) * o_sm + vt * 8 + 2 * t4) = o_pair(vt, r);
            }
#endif
        // lse after O (with TMA stores, after their issue: no fence waits for these global stores)
#pragma unroll
        for (int r = 0; r < 2; ++r)
            if (i + 8 * r < sl.L && t4 == 0)
                lseb[i + 8 * r] = empty[r] ? -CUSDPA_INF
                                  : NATURAL  ? m_i[r] + log2f(l_i[r]) * LN2
                                             : (m_i[r] + log2f(l_i[r])) * LN2;
        ph.to(PH_EPILOGUE);
    }
    // The last consumer opened the first one's barrier once more than the first consumer waited on it.
    if (FWD90_PINGPONG && cw == 0 && issued) named_sync<256>(1);
#if FWD90_SPLIT_LAST
    if (split_handed) named_sync<MMA_WG * 128>(BAR_SPLIT_READ);  // (the first warpgroup's last arrival there)
#endif
#if FWD90_TMA_STORE
    if (threadIdx.x % 128 == 0) bulk_wait<false>();  // the last stores done before the shared memory goes
#endif
    if (CLUSTER > 1) cluster_sync();  // the other CTA's consumers are done arriving on this CTA's barriers
    ph.to(PH_END);
}
