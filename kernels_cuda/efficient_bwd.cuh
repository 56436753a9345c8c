// Backward tile loops of the EFFICIENT backend's tensor_core variant: FlashAttention-2's two kernels on
// mma.sync, deterministic (no atomics), called once per thread block (4 warps) by Numba kernels
// (kernels_numba/tensor_core.py) that have resolved batch, head, varlen offsets and strides into row
// pointers. With P = exp(S - lse) recomputed from the forward's lse and Z = keep / (1 - p):
//   dV = (P o Z)^T dO,  dP = (dO V^T) o Z,  dS = P o (dP - D),  dQ = scale dS K,  dK = scale dS^T Q,
// D = rowsum(dO o O) (FlashAttention's; equal to rowsum(P o dP) and one pass cheaper than summing it).
//
// dq: 64 query rows (16 per warp), Q and dO as A fragments in registers; per key tile S = Q K^T and
//     dP = dO V^T, dS in registers, dQ += dS K with dS rounded to the input type as the A operand and K
//     read back transposed. It writes D for the dk/dv kernel (launched after it), and dS itself where a
//     float mask's gradient has one element per score, or adds dS with atomics into an fp32 sum where its
//     elements are shared by several scores (EFF_DMASK_ADD: a mask broadcast over batch, heads or queries; the
//     order of the adds varies run to run, so not in a deterministic backward).
// dkdv: 64 keys (16 per warp), K as A fragments in registers and V in shared memory; per step of EFF_BLOCK_N
//     (32; 16 for fp32 past head dim 64, to fit shared memory) queries of each query head of the GQA group S^T = K Q^T and dP^T = V dO^T, then dV += (P o Z)^T dO
//     and dK += dS^T Q.
// dkdv with EFF_FUSED (16-bit types: whole rows per warp; fp32 with column parts too): dQ too, so one kernel
//     runs the five products FlashAttention-2's backward needs instead of seven: K also in shared memory
//     (non-finite values zeroed, as for the dq kernel), each step's dS^T written there transposed, dQ += dS K
//     over the block's keys (64, or 32 with column parts), and the step's rows added into an fp32 accumulator
//     with atomics (four-wide vector reductions on sm_90). The order of those adds varies run to run: the
//     non-deterministic backward, as PyTorch's EFFICIENT_ATTENTION and FLASH's default are; a pre-pass writes D
//     and zeroes the accumulator (16-bit types: kernels_numba/dq_accumulate.py; fp32: the dq kernel over no keys,
//     whose D is exact where a row sees one key), a post-pass scales and rounds it into dq. 16 queries a step at
//     head dim 128 (fp32: at every head dim) in static shared memory, to fit 48 KiB.
// EFF_MASK_TILE: the mask's elements of each tile pair staged in shared memory with the operand tiles (MaskTile,
//     as the forward's).
// Column parts (EFF_COL_PARTS = 2) for head dims whose three fragment sets would not fit a thread's registers
//     (16-bit past 128, fp32 past 96): the two warps of a pair take the same 16 rows, both compute S and dP over
//     the whole head dim, and each accumulates half of dQ's (dK's and dV's) columns. A block then covers 32
//     rows; the duplicated S and dP cost half again the tensor work of a block, far less than the portable
//     kernels' fp32 CUDA-core products these head dims took before.
// EFF_SHARE_SCORES (column parts only; KernelConfig.tensor_core_shared_scores): the pair splits the score
//     products instead of duplicating them -- part 0 takes S (S^T = K Q^T), part 1 dP (dP^T = V dO^T), so a dq
//     warp holds one A fragment set, not two -- and trades halves through shared memory (ScoreSwap): each warp
//     takes dS (and P o Z) of half the n8 tiles, and both read the whole as the A operand of their column half
//     of the gradient products. The same products and scalar steps as without it, so the same bits.
// Only seen pairs carry weight: P and dS are selected (not multiplied) to 0 elsewhere. The operands of the
// gradient products are cleaned so that 0 * NaN cannot leak: non-finite K values are zeroed for dQ (a query
// that sees such a key has a non-finite dS anyway), and Q and dO rows that see no key (lse = -inf) are
// zeroed for dK and dV -- the portable kernels' rules (kernels_numba/gradients.py).
#include "efficient_common.cuh"

namespace efficient {

constexpr int COL_PARTS = EFF_COL_PARTS, ROW_WARPS = EFF_WARPS / COL_PARTS;
constexpr int BLOCK_ROWS = 16 * ROW_WARPS;  // a block's query rows (dq) or key rows (dkdv)

// A warp's 16 rows (row group) and its share of the gradient's columns (column part); written so that without
// parts nothing is computed (the compiler cannot know that warp < EFF_WARPS).
__device__ __forceinline__ int row_group(int warp) { return COL_PARTS == 1 ? warp : warp % ROW_WARPS; }
__device__ __forceinline__ int col_part(int warp) { return COL_PARTS == 1 ? 0 : warp / ROW_WARPS; }

#ifndef EFF_SHARE_SCORES
#define EFF_SHARE_SCORES 0
#endif
#ifndef EFF_DMASK_ADD
#define EFF_DMASK_ADD 0
#endif
constexpr bool SHARE = EFF_SHARE_SCORES != 0;
static_assert(!SHARE || COL_PARTS == 2, "shared scores split a pair of column parts' products");

// Shared scores' exchange between the two warps of a row group (warps rg and rg + ROW_WARPS), in a buffer of
// SLOTS x 32 lanes x 16 bytes of the row group's (one float4 a lane: an n8 tile's C fragment, or operands),
// synchronised by the pair's own named barrier (ids 1 and 2: 0 is __syncthreads'; no other named barrier in
// these loops). A warp's half of NT n8 tiles is tiles part * NT / 2 on. The order, per step, of who writes and
// reads which slots (tiles nt of one half, then of the other) makes one buffer serve both exchanges: a warp
// writes scores into the other half's slots, reads its own half's, then writes its operands into its own half's
// slots (which the other warp only reads after the next barrier), and reads them all; the tile loops' closing
// __syncthreads orders the next step's first writes after this step's last reads.
template <int NT>
struct ScoreSwap {
  static constexpr int HALF = NT / 2;
  static_assert(NT % 2 == 0, "halves of whole n8 tiles");
  float4* buf;  // this row group's slots
  int part, lane, rg;

  __device__ __forceinline__ void sync() const { asm volatile("bar.sync %0, 64;" ::"r"(1 + rg) : "memory"); }
  __device__ __forceinline__ float4* slot(int s) const { return buf + s * 32 + lane; }

  // mine: S (part 0) or dP (part 1) over all NT tiles. Out: S and dP of this warp's half, as computed (selected,
  // not recomputed or rounded).
  __device__ __forceinline__ void scores(const float (&mine)[NT][4], float (&s)[HALF][4], float (&dp)[HALF][4]) const {
#pragma unroll
    for (int h = 0; h < HALF; ++h) {  // the other warp's half of mine
      float x[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) x[i] = part == 0 ? mine[HALF + h][i] : mine[h][i];
      *slot((1 - part) * HALF + h) = make_float4(x[0], x[1], x[2], x[3]);
    }
    sync();
#pragma unroll
    for (int h = 0; h < HALF; ++h) {
      const float4 w = *slot(part * HALF + h);
      const float theirs[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        s[h][i] = part == 0 ? mine[h][i] : theirs[i];
        dp[h][i] = part == 0 ? theirs[i] : mine[HALF + h][i];
      }
    }
  }

  // One n8 tile of an A operand (a PFrag's r[nt]): float[4] (fp32) fills a slot, u32[2] (16-bit) its lower or
  // upper 8 bytes.
  static __device__ __forceinline__ void put(float4* at, const float (&x)[4]) {
    *at = make_float4(x[0], x[1], x[2], x[3]);
  }
  static __device__ __forceinline__ void get(const float4* at, float (&x)[4]) {
    const float4 w = *at;
    x[0] = w.x, x[1] = w.y, x[2] = w.z, x[3] = w.w;
  }
  static __device__ __forceinline__ void put(float4* at, const u32 (&x)[2], int half) {
    reinterpret_cast<uint2*>(at)[half] = make_uint2(x[0], x[1]);
  }
  static __device__ __forceinline__ void get(const float4* at, u32 (&x)[2], int half) {
    const uint2 w = reinterpret_cast<const uint2*>(at)[half];
    x[0] = w.x, x[1] = w.y;
  }
  // This warp's half of the A operands (a PFrag<HALF>) out, into its own half's slots; the pair's whole
  // (a PFrag<NT>) in. Two operands: the second in the upper 8 bytes of the slots (16-bit) or the slots NT on.
  template <class F, class G>
  __device__ __forceinline__ void operands(const F& mine, G& all) const {
#pragma unroll
    for (int h = 0; h < HALF; ++h) put_one(part * HALF + h, mine.r[h], 0);
    sync();
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) get_one(nt, all.r[nt], 0);
  }
  template <class F, class G>
  __device__ __forceinline__ void operands(const F& mine_a, const F& mine_b, G& all_a, G& all_b) const {
#pragma unroll
    for (int h = 0; h < HALF; ++h) {
      put_one(part * HALF + h, mine_a.r[h], 0);
      put_one(part * HALF + h, mine_b.r[h], 1);
    }
    sync();
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      get_one(nt, all_a.r[nt], 0);
      get_one(nt, all_b.r[nt], 1);
    }
  }
  // which = 1: the second operand, in the slot's upper 8 bytes (u32[2]) or the slot NT on (float[4])
  __device__ __forceinline__ void put_one(int s, const float (&x)[4], int which) const { put(slot(s + which * NT), x); }
  __device__ __forceinline__ void put_one(int s, const u32 (&x)[2], int which) const { put(slot(s), x, which); }
  __device__ __forceinline__ void get_one(int s, float (&x)[4], int which) const { get(slot(s + which * NT), x); }
  __device__ __forceinline__ void get_one(int s, u32 (&x)[2], int which) const { get(slot(s), x, which); }
};

struct BwdArgs : SliceArgs {  // bh: the dq slice's, or the dk/dv group's first query head's
  const Elem *q, *k, *v, *dout, *out;  // row r at base + r * row stride, unit stride along the head dim
  i64 q_rs, k_rs, v_rs, do_rs, o_rs;
  const float* lse;  // natural log, -inf for a row that sees no key
  i64 lse_rs;
  float* delta;  // D: written by dq, read by dkdv
  i64 delta_rs;
  Elem* dx;  // dq (dq kernel) or dk (dkdv kernel)
  i64 dx_rs;
  Elem* dv;
  i64 dv_rs;
  unsigned char* dmask;  // the float mask's gradient dS, one element per score (dq kernel; null: none)
  i64 dmask_rs, dmask_cs;
  i64 head_q, head_do, head_lse, head_delta, head_mask;  // dkdv: strides between the group's query heads
  i64 first;  // the block's first query row (dq) or key row (dkdv)
  float* dq_accum;  // fused dkdv: the fp32 dQ accumulator, row stride dqa_rs, head stride head_dqa (elements)
  i64 dqa_rs, head_dqa;
  int group;
  bool want_dk, want_dv;
};

// x, rounded to the mask's element type, into element `at` of the mask's gradient.
__device__ __forceinline__ void store_mask_grad(unsigned char* p, int kind, i64 at, float x) {
  u16 h;
  switch (kind) {
    case MASK_F16: asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x)); ((u16*)p)[at] = h; break;
    case MASK_BF16: asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x)); ((u16*)p)[at] = h; break;
    case MASK_F32: ((float*)p)[at] = x; break;
    default: ((double*)p)[at] = (double)x;
  }
}

// Stores a warp's 16 rows (this thread's row0 and row0 + 8) of fp32 accumulators, scaled, in the input type.
template <int HEAD_DIM>
__device__ __forceinline__ void store_rows(Elem* dst, i64 rs, const float (&acc)[HEAD_DIM / 8][4], float scale,
                                           i64 row0, i64 n_end, i64 width, int t) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const i64 row = row0 + r * 8;
    if (row >= n_end) continue;
#pragma unroll
    for (int d = 0; d < HEAD_DIM / 8; ++d) {
      const i64 col = d * 8 + 2 * t;
      Ops::store2(dst + row * rs + col, col, width, acc[d][2 * r] * scale, acc[d][2 * r + 1] * scale);
    }
  }
}

// Zeroes the non-finite elements of a shared tile of ROWS rows, for the gradient product with it (dS K), where a
// row that does not see key j meets k_j with weight 0 (0 * inf would be NaN).
template <int HEAD_DIM, int ROWS>
__device__ __forceinline__ void keep_finite(Elem* tile) {
  constexpr int VEC = Ops::VEC, STRIDE = HEAD_DIM + VEC;
  for (int c = threadIdx.x; c < ROWS * (HEAD_DIM / VEC); c += EFF_THREADS) {
    uint4* at = reinterpret_cast<uint4*>(tile + (c / (HEAD_DIM / VEC)) * STRIDE + (c % (HEAD_DIM / VEC)) * VEC);
    uint4 w = *at;
    u32* h = reinterpret_cast<u32*>(&w);
    bool changed = false;
#pragma unroll
    for (int x = 0; x < 4; ++x) {
      const u32 kept = Ops::finite_part(h[x]);
      changed |= kept != h[x];
      h[x] = kept;
    }
    if (changed) *at = w;
  }
}

template <int HEAD_DIM, int BLOCK_N>
__device__ void backward_dq(const BwdArgs& a) {
  constexpr int VEC = Ops::VEC, STRIDE = HEAD_DIM + VEC, NTILES = BLOCK_N / 8;
  __shared__ __align__(16) Elem k_tile[BLOCK_N * STRIDE];
  __shared__ __align__(16) Elem v_tile[BLOCK_N * STRIDE];
#if EFF_MASK_TILE
  typedef MaskTile<BLOCK_ROWS, BLOCK_N> Tile;  // the block's rows x the key tile
  __shared__ __align__(16) unsigned char mask_tile[Tile::BYTES];
#endif
#if EFF_SHARE_SCORES
  __shared__ __align__(16) float4 swap_buf[ROW_WARPS * NTILES * 32];  // ScoreSwap's slots, NTILES a row group
#endif

  constexpr int COLS = HEAD_DIM / COL_PARTS;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int rg = row_group(warp), part = col_part(warp), c0 = part * COLS;
  const i64 row0 = a.first + rg * 16 + g;  // this thread's rows: row0 and row0 + 8
  const i64 m_last = min(a.vis.L, a.first + BLOCK_ROWS) - 1;
  const bool vec = vectorizable<Ops>(a.k, a.k_rs, a.E) && vectorizable<Ops>(a.v, a.v_rs, a.Ev);

#if EFF_SHARE_SCORES
  // One held set: Q (part 0, for S) or dO (part 1, for dP). dO first, in both: fp32's D below is taken on dO's
  // fragments (as without shared scores, so the same bits); part 0 then loads Q in its place.
  Ops::AFrag<HEAD_DIM> df;
  Ops::load_a<HEAD_DIM>(df, a.dout, a.do_rs, row0, a.vis.L, a.Ev, t);
  Ops::AFrag<HEAD_DIM>& af = df;
  const ScoreSwap<NTILES> swap{swap_buf + rg * NTILES * 32, part, lane, rg};
#else
  Ops::AFrag<HEAD_DIM> qf, df;
  Ops::load_a<HEAD_DIM>(qf, a.q, a.q_rs, row0, a.vis.L, a.E, t);
  Ops::load_a<HEAD_DIM>(df, a.dout, a.do_rs, row0, a.vis.L, a.Ev, t);
  const bool q_held = held_finite<HEAD_DIM>(qf), do_held = held_finite<HEAD_DIM>(df), held = q_held && do_held;
#endif
  float lse2[2], dlt[2];
  bool live[2];
#if EFF_DMASK_ADD
  // The sums are the caller's fp32 buffer, contiguous along the keys (which they never broadcast over; dmask_cs is
  // 1, tensor_core.backward checks): this thread's two rows of them from its first key pair on, found once here,
  // put a pair's sums at sum_row[r] + n0 + nt * 8, where the row and column products per pair took 10% of the
  // loop's instructions (nvcc 13.0, bf16 E = 64, inlined; 25 instructions a reduction called through the ABI).
  // A pair's two sums 8-byte aligned: one v2 reduction a pair.
  float* sum_row[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) sum_row[r] = (float*)a.dmask + ((row0 + r * 8) * a.dmask_rs + 2 * t);
  const bool sum_pairs = a.dmask_rs % 2 == 0 && a.vis.S % 2 == 0 &&
                         reinterpret_cast<unsigned long long>(a.dmask) % 8 == 0;
#endif
#if EFF_ELEM >= 2  // fp32 (ELEM_F32, ELEM_TF32)
  {
    // D_i = dO_i . O_i as a tile product on dP's own fragments, splits and order (the diagonal of dO O^T over
    // the warp's 16 rows, O staged where the key loop stages K and V): where row i sees one key j, O_i is
    // V_j's big + small, which splits as V_j does (Tf32Ops::split), so D_i = dP_ij bit for bit and dS_ij = 0
    // exactly, as autograd's softmax gives. An fp32 sum in another order left noise above fp32's floor there.
    static_assert(BLOCK_N >= 32 && EFF_WARPS == 4, "two warps' 16 rows in each of the K and V tiles");
    Elem* rows = (warp < 2 ? k_tile : v_tile) + (warp % 2) * 16 * STRIDE;
    for (int c = lane; c < 16 * HEAD_DIM; c += 32) {
      const int r = c / HEAD_DIM, e = c % HEAD_DIM;
      const i64 i = a.first + rg * 16 + r;
      rows[r * STRIDE + e] = (i < a.vis.L && e < a.Ev) ? a.out[i * a.o_rs + e] : 0.f;
    }
    __syncwarp();
    float dd[2][4];
    Ops::product_abt<HEAD_DIM, 2>(dd, df, rows, lane);
    const int diagonal = g * 4 + g / 2;  // the lane holding column g of rows g (tile 0) and g + 8 (tile 1)
    dlt[0] = __shfl_sync(0xffffffffu, (g & 1) ? dd[0][1] : dd[0][0], diagonal);
    dlt[1] = __shfl_sync(0xffffffffu, (g & 1) ? dd[1][3] : dd[1][2], diagonal);
    __syncthreads();  // every warp is done with its rows before the key loop stages its tiles there
  }
#endif
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const i64 i = row0 + r * 8;
    const float l = i < a.vis.L ? a.lse[i * a.lse_rs] : -CUSDPA_INF;
    live[r] = l != -CUSDPA_INF;
    lse2[r] = __fmul_rn(l, LOG2E);  // rounded alone, as the forward rounds its max (efficient_fwd.cuh)
#if EFF_ELEM < 2
    float sum = 0.f;  // D_i: the quad's four lanes take every fourth column
    if (i < a.vis.L)
      for (i64 e = t; e < a.Ev; e += 4) sum += Ops::to_f32(a.out[i * a.o_rs + e]) * Ops::to_f32(a.dout[i * a.do_rs + e]);
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    dlt[r] = sum;
#endif
    if (t == 0 && part == 0 && i < a.vis.L) a.delta[i * a.delta_rs] = dlt[r];
  }
#if EFF_SHARE_SCORES
  if (part == 0) Ops::load_a<HEAD_DIM>(af, a.q, a.q_rs, row0, a.vis.L, a.E, t);
  const bool held = held_finite<HEAD_DIM>(af);  // the fast split's check follows the fragments held
#endif

  float acc[COLS / 8][4];
#pragma unroll
  for (int d = 0; d < COLS / 8; ++d) acc[d][0] = acc[d][1] = acc[d][2] = acc[d][3] = 0.f;
  i64 lo, hi;
  a.vis.key_range(a.first, m_last + 1, lo, hi);
  for (i64 n0 = lo / BLOCK_N * BLOCK_N; n0 < hi; n0 += BLOCK_N) {
    stage_tile<Ops, HEAD_DIM, BLOCK_N>(k_tile, a.k, a.k_rs, n0, a.vis.S, a.E, vec);
    stage_tile<Ops, HEAD_DIM, BLOCK_N>(v_tile, a.v, a.v_rs, n0, a.vis.S, a.Ev, vec);
#if EFF_MASK_TILE
    Tile::stage(mask_tile, a.mask, a.first, a.vis.L, n0, a.vis.S);
#endif
    cp_async_commit();
    cp_async_wait<0>();
    const bool finite = landed<Ops, HEAD_DIM, BLOCK_N>(k_tile, v_tile);
    // this warp's n8 tiles of dS: all, or with shared scores its half (tiles nt = part * MINE + h)
    constexpr int MINE = SHARE ? NTILES / 2 : NTILES;
    float s[MINE][4], dp[MINE][4];
#if EFF_SHARE_SCORES
    {
      float mine[NTILES][4];  // S = Q K^T (part 0) or dP = dO V^T (part 1): one product a warp, not both
      EFF_SPLIT_BY(held && finite,
                   (Ops::product_abt<HEAD_DIM, NTILES, false, FAST>(mine, af, part == 0 ? k_tile : v_tile, lane)));
      swap.scores(mine, s, dp);
    }
#else
    EFF_SPLIT_BY(held && finite, (Ops::product_abt<HEAD_DIM, NTILES, false, FAST>(s, qf, k_tile, lane)));
    EFF_SPLIT_BY(held && finite, (Ops::product_abt<HEAD_DIM, NTILES, false, FAST>(dp, df, v_tile, lane)));
#endif

    const bool full = MASK_KIND == MASK_NONE && a.vis.tile_full(a.first, m_last + 1 - a.first, n0, BLOCK_N);
    // (masked loops) NaN where a raw score this warp holds is not finite. A non-finite k_j makes every row's raw
    // score with key j non-finite (0 * inf is NaN), so where no warp's is, K needs no cleaning below.
    float poison = 0.f;
    const PairVisibility pv(a.vis, row0, n0 + 2 * t);  // pairs (row0 + dr, n0 + 2 t + dc)
    Ops::PFrag<NTILES> sf;  // dS as the A operand of dS K
#if EFF_SHARE_SCORES
    Ops::PFrag<MINE> sf_mine;  // this warp's half of it, traded below
#else
    Ops::PFrag<NTILES>& sf_mine = sf;
#endif
#pragma unroll
    for (int h = 0; h < MINE; ++h) {
      const int nt = SHARE ? part * MINE + h : h;
      float ds[4];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const i64 i = row0 + r * 8, j0 = n0 + nt * 8 + 2 * t;
        bool keep[2] = {true, true};
        if (DROPOUT) a.drop.keep_pair(a.bh, (u32)i, (u32)j0, keep[0], keep[1]);
#if EFF_DMASK_ADD
        bool took[2];
#endif
        float sc[2] = {s[h][2 * r] * a.scale, s[h][2 * r + 1] * a.scale};
        if (MASK_KIND != MASK_NONE) poison = fmaf(s[h][2 * r], 0.f, fmaf(s[h][2 * r + 1], 0.f, poison));
#if EFF_MASK_TILE
        if (!full) Tile::apply_pair(mask_tile, rg * 16 + g + r * 8, nt * 8 + 2 * t, sc[0], sc[1]);
#endif
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const i64 j = j0 + c;
          float v = sc[c];
#if EFF_MASK_TILE
          if (!full && !pv.visible(r * 8, nt * 8 + c)) v = -CUSDPA_INF;
#else
          if (!full) v = masked_score(pv, a.mask, row0, n0 + 2 * t, r * 8, nt * 8 + c, v);
#endif
          // a score no row takes: dS = 0 by the select (exp2_always)
          const bool on = live[r] && v != -CUSDPA_INF;
          const float p = exp2_always(__fmul_rn(v, LOG2E) - lse2[r]);
          const float z = !DROPOUT ? 1.f : keep[c] ? a.rescale : 0.f;
          const float d = on ? p * (dp[h][2 * r + c] * z - dlt[r]) : 0.f;
#if EFF_DMASK_ADD
          took[c] = on;
#else
          // one warp a score: the pair's part 0, or with shared scores the warp that computes it
          if (on && a.dmask != nullptr && (SHARE || part == 0))
            store_mask_grad(a.dmask, MASK_KIND, i * a.dmask_rs + j * a.dmask_cs, d);
#endif
          ds[2 * r + c] = d;
        }
#if EFF_DMASK_ADD
        // fp32 sums of shared elements, by the warp that owns the score (as above); a pair of adjacent sums in
        // one vector reduction, adding +0 for a score not taken (its dS), which leaves a sum as it was
        if (a.dmask != nullptr && (SHARE || part == 0)) {
          float* at = sum_row[r] + (n0 + nt * 8);
          if (sum_pairs) {
            if (took[0] || took[1]) red_add2(at, ds[2 * r], ds[2 * r + 1]);
          } else {
            if (took[0]) red_add1(at, ds[2 * r]);
            if (took[1]) red_add1(at + 1, ds[2 * r + 1]);
          }
        }
#endif
      }
      Ops::set_operand(sf_mine, h, ds);
    }
#if EFF_SHARE_SCORES
    swap.operands(sf_mine, sf);  // both warps' halves: dS whole, the A operand of each one's column half
#endif
    // Zero K's non-finite values for dS K, where a row that does not see key j meets k_j with weight 0. On a
    // full tile every row sees every key: a non-finite k_j makes every row's dQ non-finite anyway. A masked
    // loop's barrier (every warp has read K for S) also says whether some warp's raw scores were not finite;
    // else K is finite, and the pass and its barrier are skipped on each of its tiles. (Unmasked loops clean
    // their few tiles that are not full, at the band's edges and the lengths' ends, as they did: the poison
    // test raised their spills, 120 -> 148 bytes at head dim 128.)
    if (!full) {
      bool dirty = true;
      if (MASK_KIND == MASK_NONE)
        __syncthreads();
      else
        dirty = __syncthreads_or(poison != 0.f);
      if (dirty) {
        keep_finite<HEAD_DIM, BLOCK_N>(k_tile);
        __syncthreads();
      }
    }
    EFF_SPLIT_BY(finite, (Ops::product_pb<HEAD_DIM, NTILES, COLS, FAST>(acc, sf, k_tile + c0, lane)));
    __syncthreads();  // every warp is done with both tiles before the next ones are staged
  }
  store_rows<COLS>(a.dx + c0, a.dx_rs, acc, a.scale, row0, a.vis.L, a.E - c0, t);
}

// EFF_DYNAMIC_SMEM (dk/dv loops; KernelConfig.tensor_core_dynamic_smem): the loop's tiles in the block's dynamic
// shared memory, which the launch sizes past the 48 KiB a block may declare statically, so that steps of 32
// queries fit where static memory held 16 (the fused loop at head dim 128, fp32 past 64, 16-bit past 224).
// EFF_SHARED declares one tile either way: a static array, or the next 16-byte-aligned piece of that memory.
#ifndef EFF_DYNAMIC_SMEM
#define EFF_DYNAMIC_SMEM 0
#endif
#if EFF_DYNAMIC_SMEM
template <class T>
__device__ __forceinline__ T* carve(unsigned char*& cursor, int count) {
  T* piece = reinterpret_cast<T*>(cursor);
  cursor += (count * int(sizeof(T)) + 15) / 16 * 16;
  return piece;
}
#define EFF_SHARED(T, name, count) T* name = carve<T>(dynamic_cursor, count)
#define EFF_SHARED_WORDS(T, name, count) EFF_SHARED(T, name, count)
#else
#define EFF_SHARED(T, name, count) __shared__ __align__(16) T name[count]
#define EFF_SHARED_WORDS(T, name, count) __shared__ T name[count]  // 4-byte aligned
#endif

template <int HEAD_DIM, int BLOCK_M>  // BLOCK_M: queries per step
__device__ void backward_dkdv(const BwdArgs& a) {
  constexpr int VEC = Ops::VEC, STRIDE = HEAD_DIM + VEC;
  constexpr int QT = BLOCK_M / 8, COLS = HEAD_DIM / COL_PARTS;
#if EFF_DYNAMIC_SMEM
  extern __shared__ __align__(16) unsigned char eff_dynamic[];
  unsigned char* dynamic_cursor = eff_dynamic;
#endif
  EFF_SHARED(Elem, v_tile, BLOCK_ROWS * STRIDE);  // the block's V rows: dP^T = V dO^T's A operand
  EFF_SHARED(Elem, q_tile, BLOCK_M * STRIDE);
  EFF_SHARED(Elem, do_tile, BLOCK_M * STRIDE);
  EFF_SHARED_WORDS(float, lse_tile, BLOCK_M);  // lse in the log2 domain
  EFF_SHARED_WORDS(float, delta_tile, BLOCK_M);
  static_assert(BLOCK_M <= 32, "a step's rows: one bit each of a word");
  EFF_SHARED_WORDS(u32, dead_rows, 1);  // bit r: the step's row r lies below L and sees no key
#if EFF_MASK_TILE
  typedef MaskTile<BLOCK_M, BLOCK_ROWS> Tile;  // the step's queries x the block's keys
  EFF_SHARED(unsigned char, mask_tile, Tile::BYTES);
#endif
#if EFF_FUSED
  // (16-bit types take dS^T from the whole operand sf, which column parts with shared scores fill only after
  // the tile loop's exchange; fp32 writes each element as computed)
  static_assert(COL_PARTS == 1 || EFF_ELEM >= 2, "the fused 16-bit loop is written for whole rows per warp");
  constexpr int DS_STRIDE = BLOCK_ROWS + VEC;  // ds_tile: [query][key], the block's keys (+16 bytes: ldmatrix's
                                                // rows fall on distinct banks; fp32's writes too)
  EFF_SHARED(Elem, k_tile, BLOCK_ROWS * STRIDE);  // the block's K rows: dQ = dS K's B operand
  EFF_SHARED(Elem, ds_tile, BLOCK_M * DS_STRIDE);
#endif
#if EFF_SHARE_SCORES
  // ScoreSwap's slots, a row group's: the scores, then (P o Z)^T and dS^T (four-word fp32 operands: two slots)
  constexpr int SWAP_SLOTS = QT * (sizeof(Ops::PFrag<1>) > 8 ? 2 : 1);
  EFF_SHARED(float4, swap_buf, ROW_WARPS * SWAP_SLOTS * 32);
#endif

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int rg = row_group(warp), part = col_part(warp), c0 = part * COLS;
  const i64 key0 = a.first + rg * 16 + g;  // this thread's keys: key0 and key0 + 8
  const i64 n_last = min(a.vis.S, a.first + BLOCK_ROWS) - 1;
  Ops::AFrag<HEAD_DIM> kf;
#if EFF_SHARE_SCORES
  // K held by part 0 alone (S^T = K Q^T); part 1 takes dP^T = V dO^T from shared memory
  if (part == 0) Ops::load_a<HEAD_DIM>(kf, a.k, a.k_rs, key0, a.vis.S, a.E, t);
  const ScoreSwap<QT> swap{swap_buf + rg * SWAP_SLOTS * 32, part, lane, rg};
#else
  Ops::load_a<HEAD_DIM>(kf, a.k, a.k_rs, key0, a.vis.S, a.E, t);
#endif
  // (with shared scores part 1 holds no K: its S^T products are part 0's)
  const bool k_held = (!SHARE || part == 0) && held_finite<HEAD_DIM>(kf);
  stage_tile<Ops, HEAD_DIM, BLOCK_ROWS>(v_tile, a.v, a.v_rs, a.first, a.vis.S, a.Ev,
                                         vectorizable<Ops>(a.v, a.v_rs, a.Ev));
#if EFF_FUSED
  stage_tile<Ops, HEAD_DIM, BLOCK_ROWS>(k_tile, a.k, a.k_rs, a.first, a.vis.S, a.E,
                                         vectorizable<Ops>(a.k, a.k_rs, a.E));
#endif
  cp_async_commit();
#if EFF_FUSED
  cp_async_wait<0>();
  __syncthreads();
  keep_finite<HEAD_DIM, BLOCK_ROWS>(k_tile);  // read only after the first step's barriers
#endif

  float dk[COLS / 8][4], dv[COLS / 8][4];
#pragma unroll
  for (int d = 0; d < COLS / 8; ++d) {
    dk[d][0] = dk[d][1] = dk[d][2] = dk[d][3] = 0.f;
    dv[d][0] = dv[d][1] = dv[d][2] = dv[d][3] = 0.f;
  }
  i64 lo, hi;
  a.vis.query_range(a.first, n_last + 1, lo, hi);
  constexpr int mask_bytes = mask_element_bytes(MASK_KIND);
  for (int hh = 0; hh < a.group; ++hh) {
    const Elem* qh = a.q + hh * a.head_q;
    const Elem* doh = a.dout + hh * a.head_do;
    const float* lse_h = a.lse + hh * a.head_lse;
    const float* delta_h = a.delta + hh * a.head_delta;
    const MaskView mask{a.mask.p + hh * a.head_mask * mask_bytes, a.mask.rs, a.mask.cs};
    const u32 bh = a.bh + hh;
    const bool vec = vectorizable<Ops>(qh, a.q_rs, a.E) && vectorizable<Ops>(doh, a.do_rs, a.Ev);
#if EFF_FUSED
    // The steps in an order rotated by the key block's index: blocks that start together would otherwise add
    // into the same dQ rows at the same time, and atomics on one address serialise.
    const i64 m_begin = lo / BLOCK_M * BLOCK_M, steps = hi > m_begin ? (hi - m_begin + BLOCK_M - 1) / BLOCK_M : 0;
    const i64 rotation = steps ? (a.first / BLOCK_ROWS) % steps : 0;
    for (i64 s = 0; s < steps; ++s) {
      const i64 m0 = m_begin + (s + rotation < steps ? s + rotation : s + rotation - steps) * BLOCK_M;
#else
    for (i64 m0 = lo / BLOCK_M * BLOCK_M; m0 < hi; m0 += BLOCK_M) {
#endif
      stage_tile<Ops, HEAD_DIM, BLOCK_M>(q_tile, qh, a.q_rs, m0, a.vis.L, a.E, vec);
      stage_tile<Ops, HEAD_DIM, BLOCK_M>(do_tile, doh, a.do_rs, m0, a.vis.L, a.Ev, vec);
#if EFF_MASK_TILE
      Tile::stage(mask_tile, mask, m0, a.vis.L, a.first, a.vis.S);
#endif
      cp_async_commit();
      if (warp == 0) {  // (BLOCK_M <= 32: the step's rows are warp 0's lanes)
        const i64 i = m0 + lane;
        const float l2 = lane < BLOCK_M && i < a.vis.L ? __fmul_rn(lse_h[i * a.lse_rs], LOG2E) : -CUSDPA_INF;
        if (lane < BLOCK_M) {
          lse_tile[lane] = l2;
          delta_tile[lane] = i < a.vis.L ? delta_h[i * a.delta_rs] : 0.f;
        }
        // a row below L that sees no key (rows past L were staged as zeros)
        const u32 dead = __ballot_sync(0xffffffffu, lane < BLOCK_M && i < a.vis.L && l2 == -CUSDPA_INF);
        if (lane == 0) *dead_rows = dead;
      }
      cp_async_wait<0>();
      // (non-finite values in rows that see no key, zeroed below, count too: the general split then, results alike)
      const bool finite = landed<Ops, HEAD_DIM, BLOCK_M>(q_tile, do_tile);
      // rows that see no key read as zeros in the gradient products (P is 0 there, but 0 * NaN is NaN); a step
      // without such rows, the usual case, skips the pass and its barrier
      if (*dead_rows) {
        for (int c = threadIdx.x; c < BLOCK_M * (HEAD_DIM / VEC); c += EFF_THREADS) {
          const int r = c / (HEAD_DIM / VEC), e = (c % (HEAD_DIM / VEC)) * VEC;
          if ((*dead_rows >> r) & 1u) {
            *reinterpret_cast<uint4*>(q_tile + r * STRIDE + e) = make_uint4(0u, 0u, 0u, 0u);
            *reinterpret_cast<uint4*>(do_tile + r * STRIDE + e) = make_uint4(0u, 0u, 0u, 0u);
          }
        }
        __syncthreads();
      }

      // this warp's n8 tiles of P and dS: all, or with shared scores its half (tiles nt = part * MINE + h)
      constexpr int MINE = SHARE ? QT / 2 : QT;
      float st[MINE][4], dpt[MINE][4];
      // S^T = K Q^T and dP^T = V dO^T: the other kernels' products with the operands' roles swapped
#if EFF_SHARE_SCORES
      {
        float mine[QT][4];  // part 0 S^T, part 1 dP^T: one product a warp, not both
        if (part == 0)
          EFF_SPLIT_BY(k_held && finite, (Ops::product_abt<HEAD_DIM, QT, true, FAST>(mine, kf, q_tile, lane)));
        else
          EFF_SPLIT_BY(finite, (Ops::product_abt_shared<HEAD_DIM, QT, true, FAST>(mine, v_tile + rg * 16 * STRIDE,
                                                                                do_tile, lane)));
        swap.scores(mine, st, dpt);
      }
#else
      EFF_SPLIT_BY(k_held && finite, (Ops::product_abt<HEAD_DIM, QT, true, FAST>(st, kf, q_tile, lane)));
      EFF_SPLIT_BY(finite, (Ops::product_abt_shared<HEAD_DIM, QT, true, FAST>(dpt, v_tile + rg * 16 * STRIDE, do_tile,
                                                                            lane)));
#endif
      const bool full = MASK_KIND == MASK_NONE && a.vis.tile_full(m0, BLOCK_M, a.first, BLOCK_ROWS);
      const PairVisibility pv(a.vis, m0 + 2 * t, key0);  // pairs (m0 + 2 t + dr, key0 + dc)
      Ops::PFrag<QT> pf, sf;  // (P o Z)^T and dS^T as A operands
#if EFF_SHARE_SCORES
      Ops::PFrag<MINE> pf_mine, sf_mine;  // this warp's half of them, traded below
#else
      Ops::PFrag<QT>&pf_mine = pf, &sf_mine = sf;
#endif
#pragma unroll
      for (int h = 0; h < MINE; ++h) {
        const int nt = SHARE ? part * MINE + h : h;
        float pz[4], ds[4];
#pragma unroll
        for (int x = 0; x < 4; ++x) {
          const i64 j = key0 + (x / 2) * 8, col = nt * 8 + 2 * t + (x % 2), i = m0 + col;
          float v = st[h][x] * a.scale;
#if EFF_MASK_TILE
          if (!full)
            v = pv.visible(nt * 8 + x % 2, (x / 2) * 8) ? Tile::apply(mask_tile, col, rg * 16 + g + (x / 2) * 8, v)
                                                        : -CUSDPA_INF;
#else
          if (!full) v = masked_score(pv, mask, m0 + 2 * t, key0, nt * 8 + x % 2, (x / 2) * 8, v);
#endif
          // a score not seen (v = -inf, or a query row that sees nothing, whose lse is -inf): P = dS = 0 by the
          // selects (exp2_always)
          const bool on = lse_tile[col] != -CUSDPA_INF && v != -CUSDPA_INF;
          const float e = exp2_always(__fmul_rn(v, LOG2E) - lse_tile[col]), p = on ? e : 0.f;
          const float z = !DROPOUT ? 1.f : a.drop.keep(bh, (u32)i, (u32)j) ? a.rescale : 0.f;
          ds[x] = on ? p * (dpt[h][x] * z - delta_tile[col]) : 0.f;
          pz[x] = p * z;
        }
        Ops::set_operand(pf_mine, h, pz);
        Ops::set_operand(sf_mine, h, ds);
#if EFF_FUSED
        // dS^T's elements of this n8 tile (keys key0, key0 + 8; queries col, col + 1) into ds_tile[query][key]:
        // 16-bit rounded as the products take them (set_operand's pairs), fp32 as they are (the product splits
        // them as dK's does; with column parts each element once: shared scores split the tiles between the
        // pair, else part 0 writes)
#pragma unroll
        for (int x = 0; x < 4; ++x) {
          Elem& at = ds_tile[(nt * 8 + 2 * t + x % 2) * DS_STRIDE + rg * 16 + g + (x / 2) * 8];
#if EFF_ELEM >= 2
          if (SHARE || part == 0) at = ds[x];
#else
          const u32 pair = sf.r[nt][x / 2];
          at = (u16)(x % 2 ? pair >> 16 : pair & 0xffffu);
#endif
        }
#endif
      }
#if EFF_SHARE_SCORES
      swap.operands(pf_mine, sf_mine, pf, sf);  // both warps' halves: the A operands of each one's column half
#endif
      if (a.want_dv) EFF_SPLIT_BY(finite, (Ops::product_pb<HEAD_DIM, QT, COLS, FAST>(dv, pf, do_tile + c0, lane)));
      if (a.want_dk) EFF_SPLIT_BY(finite, (Ops::product_pb<HEAD_DIM, QT, COLS, FAST>(dk, sf, q_tile + c0, lane)));
#if EFF_FUSED
      __syncthreads();  // every warp's dS of the step is in ds_tile
      {
        // dQ rows of the step = dS (BLOCK_M x BLOCK_ROWS keys) K (BLOCK_ROWS x HEAD_DIM): warp w takes 16 of the
        // rows and a HEAD_DIM / PARTS-wide slice of the columns
        constexpr int ROW_GROUPS = BLOCK_M / 16, PARTS = EFF_WARPS / ROW_GROUPS, COLS = HEAD_DIM / PARTS;
        constexpr int DT = COLS / 8;
        const int qr = (warp % ROW_GROUPS) * 16, c0 = (warp / ROW_GROUPS) * COLS;
        float dq[DT][4];
#pragma unroll
        for (int d = 0; d < DT; ++d) dq[d][0] = dq[d][1] = dq[d][2] = dq[d][3] = 0.f;
#if EFF_ELEM >= 2
        {
          // fp32: dS's rows as A operands in set_operand's order (an n8 tile's C fragment: rows qr + g and
          // qr + g + 8, keys 2t and 2t + 1 of each 8), K's rows read by product_pb in that order; K was kept
          // finite above, so its split takes the fast path where EFF_FAST_SPLIT allows
          Ops::PFrag<BLOCK_ROWS / 8> dsf;
#pragma unroll
          for (int kk = 0; kk < BLOCK_ROWS / 8; ++kk) {
            const float2 lo = *reinterpret_cast<const float2*>(ds_tile + (qr + g) * DS_STRIDE + kk * 8 + 2 * t);
            const float2 hi = *reinterpret_cast<const float2*>(ds_tile + (qr + g + 8) * DS_STRIDE + kk * 8 + 2 * t);
            const float c[4] = {lo.x, lo.y, hi.x, hi.y};
            Ops::set_operand(dsf, kk, c);
          }
          EFF_SPLIT_BY(true, (Ops::product_pb<HEAD_DIM, BLOCK_ROWS / 8, COLS, FAST>(dq, dsf, k_tile + c0, lane)));
        }
#else
        constexpr bool BF16 = EFF_ELEM == ELEM_BF16;
        static_assert(DT % 2 == 0, "B fragments are read two n8 tiles at a time");
#pragma unroll
        for (int ks = 0; ks < BLOCK_ROWS / 16; ++ks) {
          u32 af[4];
          ldmatrix_x4(af, ds_tile + (qr + (lane / 8 % 2) * 8 + lane % 8) * DS_STRIDE + ks * 16 + (lane / 16) * 8);
#pragma unroll
          for (int d = 0; d < DT; d += 2) {
            u32 b[4];
            ldmatrix_x4_trans(b, k_tile + (ks * 16 + (lane / 8 % 2) * 8 + lane % 8) * STRIDE + c0 + d * 8 +
                                     (lane / 16) * 8);
            mma_16816<BF16>(dq[d], af, b[0], b[1]);
            mma_16816<BF16>(dq[d + 1], af, b[2], b[3]);
          }
        }
#endif
        // Four consecutive columns per reduction: lanes t and t ^ 1 trade halves, the even one then holds row g,
        // columns 2t .. 2t + 3, the odd one row g + 8, columns 2t - 2 .. 2t + 1.
        const bool even = (t & 1) == 0;
        const int row = qr + g + (even ? 0 : 8);
        float* at = a.dq_accum + hh * a.head_dqa + (m0 + row) * a.dqa_rs + c0 + 2 * (t & ~1);
        const bool live = lse_tile[row] != -CUSDPA_INF;  // false past L and for a row that sees no key (dS = 0)
#pragma unroll
        for (int d = 0; d < DT; ++d) {
          const float x = __shfl_xor_sync(0xffffffffu, even ? dq[d][2] : dq[d][0], 1);
          const float y = __shfl_xor_sync(0xffffffffu, even ? dq[d][3] : dq[d][1], 1);
          if (live) {
            if (even)
              red_add4(at + d * 8, dq[d][0], dq[d][1], x, y);
            else
              red_add4(at + d * 8, x, y, dq[d][2], dq[d][3]);
          }
        }
      }
#endif
      __syncthreads();  // every warp is done with this step's tiles before the next ones are staged
    }
  }
  cp_async_wait<0>();  // no step ran: the V tile's copies still end before the block does
  if (a.want_dk) store_rows<COLS>(a.dx + c0, a.dx_rs, dk, a.scale, key0, a.vis.S, a.E - c0, t);
  if (a.want_dv) store_rows<COLS>(a.dv + c0, a.dv_rs, dv, 1.f, key0, a.vis.S, a.Ev - c0, t);
}

}  // namespace efficient

// The C-ABI entries the Numba kernels call (one of them per module: EFF_DQ or not); EFF_NAME, EFF_HEAD_DIM,
// EFF_BLOCK_N, EFF_ELEM, EFF_DROPOUT and EFF_MASK_KIND come in front of this source from
// kernels_numba.tensor_core. Pointers travel as
// integers, strides in elements; each returns 0 (Numba's C ABI would lower a void result to a pointer).
extern "C" __device__ int EFF_NAME(
    unsigned long long q, long long q_rs, unsigned long long k, long long k_rs, unsigned long long v,
    long long v_rs, unsigned long long dout, long long do_rs, unsigned long long out, long long o_rs,
    unsigned long long lse, long long lse_rs, unsigned long long delta, long long delta_rs, unsigned long long dx,
    long long dx_rs, unsigned long long dv, long long dv_rs, unsigned long long dmask, long long dmask_rs,
    long long dmask_cs, unsigned long long mask, long long mask_rs, long long mask_cs, long long head_q,
    long long head_do, long long head_lse, long long head_delta, long long head_mask, long long first, long long L,
    long long S, long long E, long long Ev, long long shift, long long left, long long right, float scale,
    long long bh, long long group, long long want_dk, long long want_dv, long long seed_lo, long long seed_hi,
    long long offset, long long threshold, float rescale, unsigned long long dq_accum, long long dqa_rs,
    long long head_dqa) {
  using namespace efficient;
  BwdArgs a;
  a.q = (const Elem*)q;
  a.k = (const Elem*)k;
  a.v = (const Elem*)v;
  a.dout = (const Elem*)dout;
  a.out = (const Elem*)out;
  a.q_rs = q_rs;
  a.k_rs = k_rs;
  a.v_rs = v_rs;
  a.do_rs = do_rs;
  a.o_rs = o_rs;
  a.lse = (const float*)lse;
  a.lse_rs = lse_rs;
  a.delta = (float*)delta;
  a.delta_rs = delta_rs;
  a.dx = (Elem*)dx;
  a.dx_rs = dx_rs;
  a.dv = (Elem*)dv;
  a.dv_rs = dv_rs;
  a.dmask = (unsigned char*)dmask;
  a.dmask_rs = dmask_rs;
  a.dmask_cs = dmask_cs;
  a.head_q = head_q;
  a.head_do = head_do;
  a.head_lse = head_lse;
  a.head_delta = head_delta;
  a.head_mask = head_mask;
  a.first = first;
  a.dq_accum = (float*)dq_accum;
  a.dqa_rs = dqa_rs;
  a.head_dqa = head_dqa;
  a.group = (int)group;
  a.want_dk = want_dk != 0;
  a.want_dv = want_dv != 0;
  a.set(mask, mask_rs, mask_cs, E, Ev, L, S, shift, left, right, scale, bh, seed_lo, seed_hi, offset, threshold,
        rescale);
#if EFF_DQ
  backward_dq<EFF_HEAD_DIM, EFF_BLOCK_N>(a);
#else
  backward_dkdv<EFF_HEAD_DIM, EFF_BLOCK_N>(a);
#endif
  return 0;
}
