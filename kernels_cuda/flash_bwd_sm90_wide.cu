// FLASH backward on Hopper (sm_90a) for head dims above 128 (E and Ev multiples of 32 from 64 to 256, one of
// them above 128): flash_bwd_sm90.cu's structure (TMA producer, two consumer warpgroups, wgmma for all five
// products, dQ into the blocked fp32 accumulator), its work split otherwise, since 64 keys' dK and dV of
// a whole head dim no longer fit one warpgroup's registers.
//
// flash_bwd_sm90_wide: one CTA per block of BLOCK_N = 64 keys of one (batch, kv head), looping over the
// query heads of the GQA group and their query blocks (BLOCK_M = 64 rows per step). Consumer warpgroup w
//   - computes S^T = K Q^T and dP^T = V dO^T of all 64 keys for queries [32 w, 32 w + 32) of the step,
//     and from them P^T and dS^T (masked pairs selected to 0, the dropout keep-mask applied);
//   - stores both into shared memory (key-major tiles in the 128-byte swizzle), where the two halves meet;
//   - keeps dK and dV of all 64 keys for its part of the head dims in registers (warpgroup 0 the first E_W0
//     columns of dK and dQ, half of E rounded up to 32, and the first EV_W0 of dV, half of Ev rounded
//     down to 32, warpgroup 1 the rest: where a head dim does not halve into multiples of 32 the larger
//     parts of dK/dQ and of dV go to different warpgroups, which balances their steps):
//     dV += P^T dO and dK += dS^T Q with P^T and dS^T read from shared memory;
//   - computes dQ_step = dS K for its part of dQ's columns and adds it into the accumulator block with
//     vector reductions (red.add.v4.f32), coalesced in the block's fragment order (flash_bwd_dq_convert reads
//     it), since a piece of 64 x 128 floats would leave no room for Q and dO stages in shared memory.
// Order within a step: P^T and dS^T stored, the warpgroups meet, dV and dQ_step issued, dK issued once dV is
// done, dQ_step reduced while dK runs.
//
// Deterministic mode: as flash_bwd_sm90.cu (the order key blocks arrive in: highest first under a band,
// rotated start blocks when every pair is visible), but in two copies of the accumulator, even key blocks
// adding into one and odd into the other, so that the blocks that add into a copy's block one after the
// other do so two steps apart: a count moves on a reduction's round trip after the reductions, which one
// step did not always cover (0.72-0.84x the default's speed in one copy). An order warp (the producer
// warpgroup's second warp) keeps the counts: it waits for the count before each step's reductions and lets
// the consumers go at a barrier, then waits at a second barrier for their reductions and moves the count
// on with release semantics, so the consumers never spin or fence (fencing their own reductions, right
// after them or half a step later, cost them the round trip).
//
// Extra -D options: BWD90_BLOCK_M (64).
#include "sm90.cuh"
// @WGMMA_WRAPPERS@ 32 64 96 128
#include "bwd_sm90.cuh"

namespace wide90 {
constexpr int NTHREADS = 3 * 128;
constexpr int BLOCK_N = 64;  // keys per CTA
constexpr int BLOCK_M = BWD90_BLOCK_M;
constexpr int STAGES = 2;
constexpr int QT = 4;  // n8 tiles of a warpgroup's S^T: 32 queries
// columns of dK / dQ and of dV of warpgroup 0 (half, rounded up to 32 for dK / dQ and down for dV) and of
// warpgroup 1 (the rest): a product's B operand read transposed (MN-major) starts on a swizzle chunk,
// never inside one. At E = Ev = 160 warpgroup 0 does 832 units of a step and warpgroup 1 768 (896 and 704
// with both rounded up), the units 64 keys x 32 queries x a column: E + Ev for S^T and dP^T, twice the
// warpgroup's columns for each of dV, dK and dQ.
constexpr int E_W0 = (HEAD_DIM / 2 + 31) / 32 * 32, E_W1 = HEAD_DIM - E_W0;
constexpr int EV_W1 = (HEAD_DIM_V / 2 + 31) / 32 * 32, EV_W0 = HEAD_DIM_V - EV_W1;
// Swizzle of each operand's tiles: 128 bytes (64 columns) where both warpgroups' parts are multiples of 64
// columns, else 64 bytes (32 columns), so that each part starts on a column chunk (sm90_wide_chunk).
constexpr int QK_SW = E_W0 % 64 == 0 && E_W1 % 64 == 0 ? 128 : 64;  // Q, K
constexpr int V_SW = EV_W0 % 64 == 0 && EV_W1 % 64 == 0 ? 128 : 64;  // V, dO
constexpr int SK_BYTES = BLOCK_N * HEAD_DIM * 2, SV_BYTES = BLOCK_N * HEAD_DIM_V * 2;
constexpr int SQ_BYTES = BLOCK_M * HEAD_DIM * 2, SDO_BYTES = BLOCK_M * HEAD_DIM_V * 2;
constexpr int SPDS_BYTES = BLOCK_N * BLOCK_M * 2;  // P^T or dS^T: 64 keys x 64 queries
constexpr int DQ_BLOCK = BLOCK_M * HEAD_DIM;  // floats of one accumulator block
constexpr int LOAD_REGS = 24, MMA_REGS = 240;
constexpr int CONSUMER_WARPS = 8;
constexpr int BAR_PDS = 1;  // named barrier of the consumers: P^T/dS^T exchange
// deterministic mode, consumers and the order warp: the count is there (reduce), the reductions are issued
constexpr int BAR_REDUCE = 2, BAR_REDUCED = 3, ORDER_THREADS = CONSUMER_WARPS * 32 + 32;
static_assert(128 * LOAD_REGS + CONSUMER_WARPS * 32 * MMA_REGS <= 65536 / NTHREADS / 8 * 8 * NTHREADS,
              "register reallocation beyond the launch allocation");
static_assert(HEAD_DIM % 32 == 0 && HEAD_DIM_V % 32 == 0 && E_W1 >= 32 && EV_W1 >= 32 && HEAD_DIM <= 256 &&
                  HEAD_DIM_V <= 256,
              "the wide sm90 backward takes E, Ev multiples of 32 from 64 to 256");
template <int N>
struct Cols {  // a warpgroup's column count as a type, for the consumers' generic body
    static constexpr int value = N;
};
static_assert(BLOCK_M == 64, "BWD90_BLOCK_M: 64 queries per step");
static_assert(!MASK_GRAD, "the float attn_mask's gradient is flash_bwd_sm90.cu's (E, Ev <= 128)");
}  // namespace wide90

// acc += X B over the step's BLOCK_M queries: X (64 keys x BLOCK_M queries, P^T or dS^T) from its key-major
// shared tile in the 128-byte swizzle, B (BLOCK_M queries x N columns, dO or Q) read transposed from the
// column chunk `sB` points at (SW-byte swizzle; issued, not waited for).
template <int N, int SW>
__device__ __forceinline__ void issue_pds_b(float (&acc)[N / 2], const unsigned char* sX, const unsigned char* sB) {
    using wide90::BLOCK_M;
    const unsigned long long dx = sw_desc<128>(sX, 16), db = sw_desc<SW>(sB, BLOCK_M * SW);
#pragma unroll
    for (int kk = 0; kk < BLOCK_M / 16; ++kk) wgmma_ss<0, 1>(acc, desc_plus(dx, kk * 32), desc_plus(db, kk * 16 * SW), 1);
}

extern "C" __global__ void __launch_bounds__(wide90::NTHREADS, 1)
flash_bwd_sm90_wide(BWD90_KERNEL_PARAMS) {
    using namespace wide90;
    extern __shared__ __align__(1024) unsigned char smem[];
    unsigned char* sPt;  // two buffers each of P^T and dS^T: a step writes one pair while the last is read
    const Bwd90Smem sm = carve_smem<BLOCK_N, BLOCK_M, STAGES, 4 * SPDS_BYTES>(smem, sPt);
    unsigned char* sdSt = sPt + 2 * SPDS_BYTES;
    unsigned long long *kv_full = sm.bars, *q_full = sm.bars + 2, *q_empty = q_full + STAGES,
                       *stats_full = q_empty + STAGES;

    const int warp = warp_index(), lane = threadIdx.x % 32, wg = warp / 4;
    const Slice slice = Slice::per_kv_head(Hq, group, cu_q, cu_k, L, S, left, right, lower_right);
    Bwd90Cta cta;
    if (!cta.start<BLOCK_N, BLOCK_M, STAGES>(slice, group, descending, rotate, sm.bars, CONSUMER_WARPS * 32)) return;
    skip_unseen_block<BLOCK_N>(cta, slice, group, seen, sk_b, sk_h, sem_offset >= 0);
    // deterministic mode: a counter per accumulator block after the accumulator (sem_offset < 0: unordered);
    // with two copies (acc_copy floats apart) even key blocks add into copy 0, odd ones into copy 1, each
    // copy with its counters (the blocks of copy 0, then those of copy 1)
    const int copies = acc_copy != 0 ? 2 : 1, copy = cta.n % copies;
    int* sem = sem_offset >= 0 ? reinterpret_cast<int*>(dq_accum + sem_offset) + copy * (acc_copy / DQ_BLOCK) : nullptr;
    float* const accum = dq_accum + copy * acc_copy;
    const Visibility<int>& vis = slice.vis;
    const int n0 = cta.n0, steps = cta.steps;
    StepWalk<BLOCK_N, BLOCK_M> walk(cta, slice, blocks, bs_b, bs_h, bs_m, sum_bm, sum_bn, sem != nullptr);
    const int first = walk.from(0);  // steps: none taken

    if (wg == 0) {  // ---- producer ----
        setmaxnreg_dec<LOAD_REGS>();
        if (warp == 1 && sem != nullptr) {  // ---- order warp (deterministic mode) ----
            for (int it = 0; it < steps; ++it) {
                int h, mb;
                cta.order.at(it, h, mb);
                int* count = sem + slice.query_block(acc_sb, acc_sh, h, BLOCK_M, mb);
                if (lane == 0)
                    wait_for_count(count, blocks_before<BLOCK_N, BLOCK_M>(vis, cta.n, mb, cta.n_blocks, cta.rotated,
                                                                           copies));
                __syncwarp();
                named_arrive<ORDER_THREADS>(BAR_REDUCE);
                named_sync<ORDER_THREADS>(BAR_REDUCED);
                // the consumers' reductions, ordered before this by the barrier: a release is cumulative
                if (lane == 0) release_count(count);
            }
            return;
        }
        if (warp != 0 || first >= steps) return;
        produce<BLOCK_N, BLOCK_M, STAGES, QK_SW, V_SW>(sm, slice, cta, walk, tm_q, tm_k, tm_v, tm_do, q_hm, q_bm, k_hm,
                                                       k_bm, v_hm, v_bm, do_hm, do_bm, lse, delta, lse_sb, lse_sh, seen,
                                                       sk_b, sk_h, group, lane);
        return;
    }

    // ---- consumers ----
    setmaxnreg_inc<MMA_REGS>();
    const float cap_k = SOFTCAP ? 2.f * LOG2E * (scale_log2 * LN2) / softcap : 0.f;  // the forward's soft_cap
    const int cw = wg - 1;  // queries [32 cw, 32 cw + 32) of S^T; columns of dK, dV and dQ from E_W0 cw, EV_W0 cw
    const int g = lane / 4, t = lane % 4, x = threadIdx.x % 128;
    const int j = n0 + (warp % 4) * 16 + g;  // this thread's keys are j and j + 8
    const int q_first = cta.qi_lo, q_end = min(cta.qi_hi, slice.L);  // rows that see a key
    // the warpgroup's steps, over E_W columns of dK and dQ and EV_W of dV (its part: Cols)
    auto consume = [&](auto e_cols, auto ev_cols) {
        constexpr int E_W = decltype(e_cols)::value, EV_W = decltype(ev_cols)::value;
        float dk_acc[E_W / 2], dv_acc[EV_W / 2];
#pragma unroll
        for (int i = 0; i < E_W / 2; ++i) dk_acc[i] = 0.f;
#pragma unroll
        for (int i = 0; i < EV_W / 2; ++i) dv_acc[i] = 0.f;
        const int qk_chunk0 = cw * (E_W0 / (QK_SW / 2)), v_chunk0 = cw * (EV_W0 / (V_SW / 2));  // its first chunks
        const unsigned char* sK_cols = sm.sK + qk_chunk0 * BLOCK_N * QK_SW;
        if (first < steps) mbar_wait_warp(kv_full, 0);

        for (int it = first, k = 0; it < steps; it = walk.from(it + 1), ++k) {  // k: the steps taken
            const int st = k % STAGES;
            const u32 phase = (k / STAGES) & 1;
            int h, mb;
            cta.order.at(it, h, mb);
            const int m0 = mb * BLOCK_M, c0 = m0 + 32 * cw;  // the step's rows; this warpgroup's first S^T column
            const DropScale z = drop_scale<QT>(seed_lo, seed_hi, offset, threshold, rp_dropout,
                                               static_cast<u32>(slice.b * Hq + h), j, c0 + 2 * t, lane);
            mbar_wait_warp(q_full + st, phase);
            mbar_wait(stats_full + st, phase);  // lse and D
            const unsigned char* sQs = sm.sQ + st * SQ_BYTES;
            const unsigned char* sdOs = sm.sdO + st * SDO_BYTES;
            float s[QT * 4], dp[QT * 4];
            issue_s_dp<BLOCK_N, BLOCK_M, QK_SW, V_SW, 32>(s, dp, dk_acc, dv_acc, sm.sK, sQs + 32 * cw * QK_SW, sm.sV,
                                                          sdOs + 32 * cw * V_SW);
            u32 pt[QT * 2], dst[QT * 2];
            gradients_of_step<QT>(s, dp, vis.tile_full(c0, 32, n0, BLOCK_N), walk.dense(it), vis, j, c0, t,
                                  sm.sLse + st * BLOCK_M + 32 * cw, sm.sD + st * BLOCK_M + 32 * cw, scale_log2, z,
                                  mask + slice.b * m_sb + h * m_sh, m_sm,
                              Modifiers{ALIBI ? slopes[slice.b * slopes_b + h] : 0.f, cap_k, softcap}, MaskGrad{},
                              pt, dst);
            // both halves of P^T and dS^T into shared memory (the buffers of two steps ago, which both warpgroups
            // finished reading before they met at the last step's barrier)
            unsigned char* sPts = sPt + (k % 2) * SPDS_BYTES;
            unsigned char* sdSts = sdSt + (k % 2) * SPDS_BYTES;
            store_ds_t<QT>(sPts, BLOCK_N, pt, (warp % 4) * 16, lane, QT * cw);
            store_ds_t<QT>(sdSts, BLOCK_N, dst, (warp % 4) * 16, lane, QT * cw);
            fence_proxy_async();
            named_sync<CONSUMER_WARPS * 32>(BAR_PDS);
            float dq[E_W / 2];
            fence_regs(dq);
            wgmma_fence();
            issue_pds_b<EV_W, V_SW>(dv_acc, sPts, sdOs + v_chunk0 * BLOCK_M * V_SW);
            wgmma_commit();
            issue_ds_k<BLOCK_N, QK_SW, E_W>(dq, sdSts, sK_cols);
            wgmma_commit();
            wgmma_wait<1>();  // dV done
            fence_regs(dv_acc);
            wgmma_fence();
            issue_pds_b<E_W, QK_SW>(dk_acc, sdSts, sQs + qk_chunk0 * BLOCK_M * QK_SW);
            wgmma_commit();
            wgmma_wait<1>();  // dQ_step done
            fence_regs(dq);
            // dQ_step into the accumulator while dK runs
            zero_unseen_rows<E_W>(dq, m0 + (warp % 4) * 16 + g, q_first, q_end, sm.sLse + st * BLOCK_M + (warp % 4) * 16 + g);
            const long long blk = slice.query_block(acc_sb, acc_sh, h, BLOCK_M, mb);
            float* piece = accum + blk * DQ_BLOCK + cw * 64 * E_W0;
            if (sem != nullptr) named_sync<ORDER_THREADS>(BAR_REDUCE);  // after the key blocks before this one
#pragma unroll
            for (int c = 0; c < E_W / 8; ++c)
                asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(piece + 4 * (c * 128 + x)),
                             "f"(dq[4 * c]), "f"(dq[4 * c + 1]), "f"(dq[4 * c + 2]), "f"(dq[4 * c + 3])
                             : "memory");
            if (sem != nullptr) named_arrive<ORDER_THREADS>(BAR_REDUCED);
            wgmma_wait<0>();  // dK done: the Q and dO stage is free
            fence_regs(dk_acc);
            mbar_arrive(q_empty + st);  // every thread, after its reads of the stage
        }
        const int row0 = n0 + (warp % 4) * 16;
        store_rows(slice.key_rows(dk, dk_sb, dk_sh, dk_sm) + cw * E_W0, dk_sm, dk_acc, scale, row0, slice.S, lane);
        store_rows(slice.key_rows(dv, dv_sb, dv_sh, dv_sm) + cw * EV_W0, dv_sm, dv_acc, 1.f, row0, slice.S, lane);
    };
    if constexpr (E_W0 == E_W1 && EV_W0 == EV_W1) consume(Cols<E_W0>(), Cols<EV_W0>());
    else if (cw == 0) consume(Cols<E_W0>(), Cols<EV_W0>());
    else consume(Cols<E_W1>(), Cols<EV_W1>());
}

// ---------------------------------------------------------------------------------------------------
// dQ = scale * the accumulator flash_bwd_sm90_wide reduced into (zeroed by flash_bwd_preprocess), in q's
// layout: warpgroup 0's piece holds columns [0, E_W0), warpgroup 1's the rest.
extern "C" __global__ void __launch_bounds__(CONVERT_THREADS)
flash_bwd_dq_convert(const float* __restrict__ dq_accum, elem_t* __restrict__ dq, const int* __restrict__ cu_q,
                     const int* __restrict__ cu_k, int L, int S, int Hq, long long acc_copy, long long acc_sb,
                     long long acc_sh, long long dq_sb, long long dq_sh, long long dq_sm, float scale, int left,
                     int right, int lower_right) {
    dq_convert<wide90::BLOCK_M, wide90::E_W0>(dq_accum, dq, cu_q, cu_k, L, S, Hq, acc_copy, acc_sb, acc_sh, dq_sb,
                                             dq_sh, dq_sm, scale, left, right, lower_right);
}
