// FLASH backward on Hopper (sm_90a): FlashAttention-3's backward, its products on wgmma and its loads on
// TMA, warp-specialised as the Hopper forward is.
//
// flash_bwd_sm90: one CTA per block of BLOCK_N = 128 keys of one (batch, kv head); consumer warpgroup w
// owns keys [64 w, 64 w + 64) of it and keeps their dK and dV accumulators in registers while it loops
// over the query heads of the GQA group and their query blocks (BLOCK_M rows per step):
//   S^T = K Q^T, dP^T = V dO^T                       (wgmma, both operands from shared memory, key-major:
//                                                     P^T and dS^T come out in the A-fragment layout)
//   P^T = exp2(S^T scale log2 e - lse log2 e), dS^T = P^T o (dP^T - D)     (masked pairs selected to 0)
//   dV += P^T dO, dK += dS^T Q                       (wgmma, A from registers, dO and Q read transposed)
//   dQ_step = dS K                                   (wgmma, dS^T of both warpgroups through shared memory)
// in FlashAttention-3's order: dS^T stored, dV issued, the warpgroups meet, dQ_step issued, then dK, which
// runs while dQ_step goes out;
// and hands dQ_step, through a shared-memory buffer, to a dQ writer warp, which adds each warpgroup's piece
// into an fp32 dQ accumulator in global memory with one bulk reduction (cp.reduce.async.bulk .add.f32),
// since every key block of the query rows contributes to it: the consumers store their part and go on, the
// writer waits for the reduction (FlashAttention-3's dQ path). The accumulator is blocked: per (batch, head,
// query block) BLOCK_M x E floats in the order the consumers hold them (warpgroup w's 64-row piece, then
// register k of thread x at k * 128 + x), so one contiguous reduction covers a piece and the threads'
// stores into its buffer are conflict-free; each warpgroup hands its piece over on its own barriers.
// Warpgroup w's piece is rows 64 w when BLOCK_M = 128 and a column range when BLOCK_M = 64 (DQ_N0, DQ_N1).
// flash_bwd_dq_convert then writes dQ = scale * accumulator in the input dtype, in q's layout.
//
// The order of the reductions varies run to run, and with it dQ's last bits; the deterministic mode
// orders them with a semaphore per accumulator block that counts the key blocks that have added theirs.
// Under a causal or window band a higher key block reaches a query block in fewer steps, so the order
// "highest key block first" is the order they arrive in and nobody waits long. Where every query sees
// every key (and the key blocks, all co-resident, are no more than the query blocks), key block n starts
// its query loop at block n (rotated), so at any step the key blocks add into different query blocks, in
// arrival order again (the default mode rotates too, FlashConfig.bwd90_rotate). A waited-for CTA is
// co-resident, or launched earlier: under a band, or where a slice's key blocks do not fit on the device
// at once, they launch in descending order (`descending`: blockIdx.x = 0 is the last block), so a block
// never starts after the blocks that add after it; else as in the default mode. No deadlock either way.
// The writer moves a block's count on once the block's reduction completed, which it checks when it
// comes to its next block (the buffer goes back to the consumers as soon as it was read).
//
// The producer warp loads K and V once and Q, dO (TMA) with lse and D (plain loads) into STAGES buffers.
//
// NaN where nobody looks: K and V rows only meet their own S^T and dP^T rows, which are selected out
// where no query sees the key; but dV += P^T dO and dK += dS^T Q sum over queries, multiplying a
// selected-out 0 by whatever dO and Q hold, so the producer zeroes the rows of Q and dO that see no key
// (and, in a packed batch, the next sequence's rows); dQ sums over keys, so it zeroes the K rows that no
// query of the slice sees, and rows that see no key add zeros (their accumulator stays 0).
//
// Head dims: E and Ev multiples of 32 up to 128, each operand's tiles in the Hopper forward's swizzle (64
// columns of 128 bytes, or 32 of 64 bytes where the head dim is not a multiple of 64).
//
// Dropout (IS_DROPOUT): the forward's Philox keep-mask replayed, each thread's bits gathered from the calls
// of its quad group (dropout_keep_bits).
//
// Extra -D options: BWD90_BLOCK_M (queries per step: 128 where E, Ev <= 64, else 64). The accumulator's block layout
// (DQ_BLOCK floats per block, Slice::query_block) is shared with flash_bwd_preprocess, which zeroes it.
#include "sm90.cuh"
// @WGMMA_WRAPPERS@ BWD90_BLOCK_M HEAD_DIM HEAD_DIM_V 32 64
#include "bwd_sm90.cuh"

namespace dkdv90 {
constexpr int MMA_WG = 2;
constexpr int NTHREADS = (MMA_WG + 1) * 128;
constexpr int BLOCK_N = 64 * MMA_WG;  // keys per CTA
constexpr int BLOCK_M = BWD90_BLOCK_M;
constexpr int STAGES = 2;
constexpr int QT = BLOCK_M / 8;  // n8 tiles of S^T over queries
constexpr int ET = HEAD_DIM / 8, EVT = HEAD_DIM_V / 8;
constexpr int SK_BYTES = BLOCK_N * HEAD_DIM * 2, SV_BYTES = BLOCK_N * HEAD_DIM_V * 2;
constexpr int SQ_BYTES = BLOCK_M * HEAD_DIM * 2, SDO_BYTES = BLOCK_M * HEAD_DIM_V * 2;
constexpr int SDS_BYTES = BLOCK_N * BLOCK_M * 2;  // dS^T, key-major: BLOCK_M / 64 chunks of 64 queries
constexpr int DQ_BLOCK = BLOCK_M * HEAD_DIM;  // floats of one accumulator block (a step's dQ)
constexpr int SDQ_BYTES = DQ_BLOCK * 4;        // two buffers: the writer reduces one while the next is filled
// setmaxnreg moves registers within the CTA's launch allocation (168 a thread at 384 threads): the
// consumers' increase waits forever unless the producer warpgroup's decrease freed enough.
constexpr int LOAD_REGS = 24, MMA_REGS = 240;
constexpr int CONSUMER_WARPS = MMA_WG * 4;
// Swizzle of each operand's tiles, as in the Hopper forward: bytes per row of a column chunk, 128 (64
// columns) where the head dim is a multiple of 64, else 64 (32 columns).
constexpr int QK_SW = HEAD_DIM % 64 == 0 ? 128 : 64;  // Q, K
constexpr int V_SW = HEAD_DIM_V % 64 == 0 ? 128 : 64;  // V, dO
// dQ of a step, a 64-row piece per warpgroup: BLOCK_M = 128, rows 64 w and every column; BLOCK_M = 64,
// warpgroup 0 the first DQ_N0 columns (at most 64) and warpgroup 1 the rest (none where E <= 64): pieces
// start on a swizzle chunk, as a descriptor of K read transposed must.
constexpr int DQ_N0 = BLOCK_M == 128 ? HEAD_DIM : (HEAD_DIM < 64 ? HEAD_DIM : 64);
constexpr int DQ_N1 = BLOCK_M == 128 ? HEAD_DIM : HEAD_DIM - DQ_N0;
// Named barriers (0 is __syncthreads): the consumers' dS^T exchange, and per dQ buffer and warpgroup
// piece "full" (the warpgroup arrives, the writer waits) and "empty" (the writer arrives, the warpgroup
// waits), at BAR + 2 * buffer + warpgroup, each met by one warpgroup and the writer warp.
constexpr int BAR_DS = 1, BAR_DQ_FULL = 2, BAR_DQ_EMPTY = 6;
constexpr int DQ_SYNC = 128 + 32;
// The epilogue: dK and dV staged in shared memory, then stored as whole 16-byte row segments (stage_rows,
// copy_rows_out; H200, E = 128 L = 1024: backward +6%, causal +9%; L = 4096 +2-3%), except where the step loop
// sits at the register limit already (a bool mask's bit tests, a float mask's gradient stores): there the
// staging made ptxas spill inside the step loop (E = 128 bool mask: 12 spill pairs, its backward -10%; the
// mask's gradient -20%), so they store each warp's rows from its fragments (store_rows).
constexpr bool STAGED_EPILOGUE = ATTN_MASK != 1 && !MASK_GRAD;
static_assert(128 * LOAD_REGS + CONSUMER_WARPS * 32 * MMA_REGS <= 65536 / NTHREADS / 8 * 8 * NTHREADS,
              "register reallocation beyond the launch allocation");
static_assert(HEAD_DIM % 32 == 0 && HEAD_DIM_V % 32 == 0 && HEAD_DIM <= 128 && HEAD_DIM_V <= 128,
              "the sm90 backward takes E, Ev multiples of 32 up to 128");
static_assert(BLOCK_M == 64 || (BLOCK_M == 128 && HEAD_DIM <= 64 && HEAD_DIM_V <= 64),
              "BWD90_BLOCK_M: 128 queries per step only where E, Ev <= 64 (registers), else 64");
}  // namespace dkdv90

// A warpgroup's 64 x N piece of dQ into its part of a step's buffer: register k of thread x (of 128) at
// float4 k * 128 + x, so each warp's store is 512 contiguous bytes (no bank conflicts).
template <int N>
__device__ __forceinline__ void store_dq(float* piece, const float (&dq)[N / 2], int x) {
#pragma unroll
    for (int k = 0; k < N / 8; ++k)
        reinterpret_cast<float4*>(piece)[k * 128 + x] = make_float4(dq[4 * k], dq[4 * k + 1], dq[4 * k + 2], dq[4 * k + 3]);
}

// global[0, bytes) += shared[0, bytes) in fp32, by the async proxy (one thread issues it), then committed
// as a bulk async-group.
__device__ __forceinline__ void bulk_reduce_add(float* global, const void* shared, int bytes) {
    asm volatile(
        "cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n"
        "cp.async.bulk.commit_group;\n" ::"l"(global), "r"(smem_u32(shared)), "r"(bytes)
        : "memory");
}
// Deterministic mode: the writer's bulk reductions completed and made visible (async proxy, then release)
// before the count of their block moves on.
__device__ __forceinline__ void release_reduced(int* count) {
    bulk_wait<false>();
    asm volatile("fence.proxy.async.global;\n" ::: "memory");
    release_count(count);
}

// The end of a consumer step, after dV += P^T dO was issued and both warpgroups' dS^T reached shared
// memory: dQ_step for this warpgroup's 64 x N piece (N = 0: none; rows from sdS_rows of dS^T, columns
// from sK_cols of K), then dK += dS^T Q, which runs while the piece goes to the writer warp (FlashAttention-3's
// order). Rows outside [q_first, q_end) (no key seen) are zeroed, since K may hold inf; the piece is
// stored into buffer buf once the writer has emptied it. The Q and dO stage is released when dK is done.
template <int N>
__device__ __forceinline__ void dq_dk_step(float (&dk_acc)[dkdv90::ET * 4], float (&dv_acc)[dkdv90::EVT * 4],
                                           const u32 (&dst)[dkdv90::QT * 2], const unsigned char* sQs,
                                           const unsigned char* sdS_rows, const unsigned char* sK_cols, float* piece,
                                           unsigned long long* q_empty, int bar, int row, int q_first, int q_end,
                                           const float* row_lse, int lane) {
    using namespace dkdv90;
    float dq[N > 0 ? N / 2 : 1];
    if constexpr (N > 0) {
        fence_regs(dq);
        wgmma_fence();
        issue_ds_k<BLOCK_N, QK_SW, N>(dq, sdS_rows, sK_cols);
        wgmma_commit();
        wgmma_wait<1>();  // dV done
        fence_regs(dv_acc);
    }
    wgmma_fence();
    issue_xtb<HEAD_DIM, BLOCK_M, QK_SW>(dk_acc, dst, sQs);
    wgmma_commit();
    if constexpr (N > 0) {
        wgmma_wait<1>();  // dQ_step done
        fence_regs(dq);
        zero_unseen_rows<N>(dq, row, q_first, q_end, row_lse);
        named_sync<DQ_SYNC>(BAR_DQ_EMPTY + bar);
        store_dq<N>(piece, dq, threadIdx.x % 128);
        fence_proxy_async();
        named_arrive<DQ_SYNC>(BAR_DQ_FULL + bar);
    }
    wgmma_wait<0>();  // dK (and dV) done: the Q and dO stage is free
    fence_regs(dk_acc);
    fence_regs(dv_acc);
    mbar_arrive(q_empty);  // every thread, after its reads of the stage
}

extern "C" __global__ void __launch_bounds__(dkdv90::NTHREADS, 1)
flash_bwd_sm90(BWD90_KERNEL_PARAMS) {
    using namespace dkdv90;
    extern __shared__ __align__(1024) unsigned char smem[];
    unsigned char* sdS;  // two buffers of dS^T (a step writes one while the last is read), then two of dQ
    const Bwd90Smem sm = carve_smem<BLOCK_N, BLOCK_M, STAGES, 2 * SDS_BYTES + 2 * SDQ_BYTES>(smem, sdS);
    float* sdQ = reinterpret_cast<float*>(sdS + 2 * SDS_BYTES);
    unsigned long long *kv_full = sm.bars, *q_full = sm.bars + 2, *q_empty = q_full + STAGES,
                       *stats_full = q_empty + STAGES;

    const int warp = warp_index(), lane = threadIdx.x % 32, wg = warp / 4;
    const Slice slice = Slice::per_kv_head(Hq, group, cu_q, cu_k, L, S, left, right, lower_right);
    // deterministic mode: a counter per accumulator block after the accumulator (sem_offset < 0: unordered)
    int* sem = sem_offset >= 0 ? reinterpret_cast<int*>(dq_accum + sem_offset) : nullptr;
    Bwd90Cta cta;
    if (!cta.start<BLOCK_N, BLOCK_M, STAGES>(slice, group, descending, rotate, sm.bars, CONSUMER_WARPS * 32)) return;
    skip_unseen_block<BLOCK_N>(cta, slice, group, seen, sk_b, sk_h, sem_offset >= 0);
    const Visibility<int>& vis = slice.vis;
    const int n = cta.n, n0 = cta.n0, steps = cta.steps;
    const StepOrder& order = cta.order;
    StepWalk<BLOCK_N, BLOCK_M> walk(cta, slice, blocks, bs_b, bs_h, bs_m, sum_bm, sum_bn, sem_offset >= 0);
    const int first = walk.from(0);  // steps: none taken

    if (wg == 0) {  // ---- producer and dQ writer ----
        setmaxnreg_dec<LOAD_REGS>();
        if (warp == 1) {  // the dQ writer: each step's pieces added into their accumulator block
            constexpr int PIECES = DQ_N1 > 0 ? 2 : 1;
            // the buffers of the first two steps taken are free; then each buffer once more, two steps on
            const int taken = first >= steps ? 0 : walk.from(first + 1) >= steps ? 1 : 2;
            for (int buf = 0; buf < taken; ++buf)
                for (int w = 0; w < PIECES; ++w) named_arrive<DQ_SYNC>(BAR_DQ_EMPTY + 2 * buf + w);
            // Deterministic mode: a block's count moves on once its reduction completed, which the writer
            // checks when it comes to the next block; meanwhile the buffer, read, goes back to the consumers.
            long long pending = -1;
            for (int it = first, k = 0; it < steps; ++k) {  // k: the steps taken
                const int buf = k % 2;
                int h, mb;
                order.at(it, h, mb);
                const long long blk = slice.query_block(acc_sb, acc_sh, h, BLOCK_M, mb);
                if (sem != nullptr && lane == 0) {
                    if (pending >= 0) release_reduced(sem + pending);
                    wait_for_count(sem + blk,  // after the key blocks before this one
                                   blocks_before<BLOCK_N, BLOCK_M>(vis, n, mb, cta.n_blocks, cta.rotated, 1));
                    asm volatile("fence.proxy.async.global;\n" ::: "memory");
                }
                __syncwarp();  // converged again before the .aligned barriers
                for (int w = 0; w < PIECES; ++w) {
                    named_sync<DQ_SYNC>(BAR_DQ_FULL + 2 * buf + w);
                    if (lane == 0)
                        bulk_reduce_add(dq_accum + blk * DQ_BLOCK + w * 64 * DQ_N0, sdQ + buf * DQ_BLOCK + w * 64 * DQ_N0,
                                        64 * (w == 0 ? DQ_N0 : DQ_N1) * 4);
                    __syncwarp();
                }
                if (lane == 0) bulk_wait<true>();
                __syncwarp();
                pending = blk;
                it = walk.from(it + 1);
                if (it < steps && walk.from(it + 1) < steps)
                    for (int w = 0; w < PIECES; ++w) named_arrive<DQ_SYNC>(BAR_DQ_EMPTY + 2 * buf + w);
            }
            if (lane == 0) {
                if (sem != nullptr && pending >= 0) release_reduced(sem + pending);
                bulk_wait<false>();
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
    const int cw = wg - 1;  // keys [64 cw, 64 cw + 64) of the block
    const int g = lane / 4, t = lane % 4;
    const int j = n0 + cw * 64 + (warp % 4) * 16 + g;  // this thread's keys are j and j + 8
    float dk_acc[ET * 4], dv_acc[EVT * 4];
#pragma unroll
    for (int x = 0; x < ET * 4; ++x) dk_acc[x] = 0.f;
#pragma unroll
    for (int x = 0; x < EVT * 4; ++x) dv_acc[x] = 0.f;
    const unsigned char* sKw = sm.sK + cw * 64 * QK_SW;
    const unsigned char* sVw = sm.sV + cw * 64 * V_SW;
    if (first < steps) mbar_wait_warp(kv_full, 0);

    const int mrow0 = BLOCK_M == 128 ? 64 * cw : 0;  // the first row of this warpgroup's dQ piece
    const int q_first = cta.qi_lo, q_end = min(cta.qi_hi, slice.L);  // rows that see a key
    for (int it = first, k = 0; it < steps; it = walk.from(it + 1), ++k) {  // k: the steps taken
        const int st = k % STAGES;
        const u32 phase = (k / STAGES) & 1;
        int h, mb;
        order.at(it, h, mb);
        const int m0 = mb * BLOCK_M;
        const DropScale z = drop_scale<QT>(seed_lo, seed_hi, offset, threshold, rp_dropout,
                                           static_cast<u32>(slice.b * Hq + h), j, m0 + 2 * t, lane);
        mbar_wait_warp(q_full + st, phase);
        mbar_wait(stats_full + st, phase);  // lse and D
        const unsigned char* sQs = sm.sQ + st * SQ_BYTES;
        const unsigned char* sdOs = sm.sdO + st * SDO_BYTES;
        float s[QT * 4], dp[QT * 4];
        issue_s_dp<BLOCK_N, BLOCK_M, QK_SW, V_SW, BLOCK_M>(s, dp, dk_acc, dv_acc, sKw, sQs, sVw, sdOs);
        u32 pt[QT * 2], dst[QT * 2];
        const MaskGrad mg{MASK_GRAD ? dmask + ((static_cast<long long>(slice.b) * Hq + h) * L + m0 + 2 * t) * S + j
                                    : nullptr,
                          S, L - m0 - 2 * t, S - j};
        gradients_of_step<QT>(s, dp, vis.tile_full(m0, BLOCK_M, n0 + cw * 64, 64), walk.dense(it), vis, j, m0, t,
                              sm.sLse + st * BLOCK_M, sm.sD + st * BLOCK_M, scale_log2, z,
                              mask + slice.b * m_sb + h * m_sh, m_sm,
                              Modifiers{ALIBI ? slopes[slice.b * slopes_b + h] : 0.f, cap_k, softcap}, mg, pt, dst);
        fence_regs(pt);
        fence_regs(dst);
        // dS^T of both warpgroups into shared memory for the dQ product (the buffer of two steps ago, which
        // both finished reading before they met at the last step's barrier), its stores ahead of the
        // products; then dV += P^T dO
        unsigned char* sdSs = sdS + (k % 2) * SDS_BYTES;
        store_ds_t<QT>(sdSs, BLOCK_N, dst, cw * 64 + (warp % 4) * 16, lane);
        fence_regs(dk_acc);
        fence_regs(dv_acc);
        wgmma_fence();
        issue_xtb<HEAD_DIM_V, BLOCK_M, V_SW>(dv_acc, pt, sdOs);
        wgmma_commit();
        fence_proxy_async();
        named_sync<CONSUMER_WARPS * 32>(BAR_DS);
        const unsigned char* sdS_rows = sdSs + (mrow0 / 64) * BLOCK_N * 128;
        float* piece = sdQ + (k % 2) * DQ_BLOCK + cw * 64 * DQ_N0;
        const int row = m0 + mrow0 + (warp % 4) * 16 + g, bar = 2 * (k % 2) + cw;
        const unsigned char* sK_cols = sm.sK + (BLOCK_M == 128 ? 0 : cw * DQ_N0 / (QK_SW / 2)) * BLOCK_N * QK_SW;
        if constexpr (DQ_N0 == DQ_N1)  // one copy of the code where the pieces are alike
            dq_dk_step<DQ_N0>(dk_acc, dv_acc, dst, sQs, sdS_rows, sK_cols, piece, q_empty + st, bar, row, q_first,
                              q_end, sm.sLse + st * BLOCK_M + (row - m0), lane);
        else if (cw == 0)
            dq_dk_step<DQ_N0>(dk_acc, dv_acc, dst, sQs, sdS_rows, sK_cols, piece, q_empty + st, bar, row, q_first,
                              q_end, sm.sLse + st * BLOCK_M + (row - m0), lane);
        else
            dq_dk_step<DQ_N1>(dk_acc, dv_acc, dst, sQs, sdS_rows, sK_cols, piece, q_empty + st, bar, row, q_first,
                              q_end, sm.sLse + st * BLOCK_M + (row - m0), lane);
    }

    if constexpr (STAGED_EPILOGUE) {
        // dK and dV leave through the K and V tiles' shared memory, once every consumer's products have read
        // them for the last time (the producer loads K and V once, before the first step)
        named_sync<CONSUMER_WARPS * 32>(BAR_DS);
        const int row0 = cw * 64 + (warp % 4) * 16;
        stage_rows<HEAD_DIM>(sm.sK, dk_acc, scale, row0, lane);
        stage_rows<HEAD_DIM_V>(sm.sV, dv_acc, 1.f, row0, lane);
        named_sync<CONSUMER_WARPS * 32>(BAR_DS);
        const int rows = max(0, min(BLOCK_N, slice.S - n0)), tid = threadIdx.x - 128;
        copy_rows_out<HEAD_DIM, BLOCK_N, CONSUMER_WARPS * 32>(slice.key_rows(dk, dk_sb, dk_sh, dk_sm) + n0 * dk_sm,
                                                              dk_sm, sm.sK, rows, tid);
        copy_rows_out<HEAD_DIM_V, BLOCK_N, CONSUMER_WARPS * 32>(slice.key_rows(dv, dv_sb, dv_sh, dv_sm) + n0 * dv_sm,
                                                                dv_sm, sm.sV, rows, tid);
    } else {
        const int row0 = n0 + cw * 64 + (warp % 4) * 16;
        store_rows(slice.key_rows(dk, dk_sb, dk_sh, dk_sm), dk_sm, dk_acc, scale, row0, slice.S, lane);
        store_rows(slice.key_rows(dv, dv_sb, dv_sh, dv_sm), dv_sm, dv_acc, 1.f, row0, slice.S, lane);
    }
}

// ---------------------------------------------------------------------------------------------------
// dQ = scale * the accumulator flash_bwd_sm90 reduced into (zeroed by flash_bwd_preprocess), in q's layout.
extern "C" __global__ void __launch_bounds__(CONVERT_THREADS)
flash_bwd_dq_convert(const float* __restrict__ dq_accum, elem_t* __restrict__ dq, const int* __restrict__ cu_q,
                     const int* __restrict__ cu_k, int L, int S, int Hq, long long acc_copy, long long acc_sb,
                     long long acc_sh, long long dq_sb, long long dq_sh, long long dq_sm, float scale, int left,
                     int right, int lower_right) {
    dq_convert<dkdv90::BLOCK_M, dkdv90::DQ_N0>(dq_accum, dq, cu_q, cu_k, L, S, Hq, acc_copy, acc_sb, acc_sh, dq_sb,
                                               dq_sh, dq_sm, scale, left, right, lower_right);
}
