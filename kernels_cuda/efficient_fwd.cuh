// Forward tile loop of the EFFICIENT backend's tensor_core variant: FlashAttention-2 on mma.sync.
//
// Called once per thread block (4 warps, BLOCK_M = 64 query rows, 16 per warp) by a Numba kernel
// that has already resolved batch, head, varlen offsets and strides into the row pointers below.
// Per key tile: S = Q K^T on tensor-core MMAs (fp32 accumulators; the element family's, Ops in
// efficient_common.cuh), then mask, scale and online softmax in registers (each row lives in one quad
// of 4 lanes), then O += P V with P converted to the input type. Q stays in registers (A fragments);
// K and V tiles go through shared memory with cp.async (16 B, zero-filled past the sequence) and are
// read back as fragments (ldmatrix for 16-bit types, V transposed). The V tile for tile n+1 overlaps the softmax of tile n (FlashAttention-2's
// single-buffer schedule). Rows of the V tile that no query of the block may see are zeroed before
// P V: P is 0 there, but 0 * NaN is NaN, and the contract says padding never leaks. Which keys some row sees
// is gathered in a register a thread and a word a warp's thread group.
//
// EFF_MASK_TILE (an attn_mask whose tile fits beside K and V): each tile's mask elements are copied into shared
// memory with the K tile (where the slice's mask rows are contiguous along the keys and 16-byte aligned, by 16-byte
// cp.async, in flight while the previous tile's products run; other masks element by element), instead of each
// thread loading its 32 scores' elements from global memory one by one when the scores are ready, a memory latency
// per tile on the critical path.
//
// Only NVRTC built-ins and inline PTX, here and in common.cuh: no headers, so it compiles wherever Numba
// finds NVRTC.
#include "efficient_common.cuh"

namespace efficient {

struct Args : SliceArgs {
  const Elem* q;  // q[row][e] at q + row * q_rs + e (unit stride along e), rows from this block's sequence start
  i64 q_rs;
  const Elem* k;
  i64 k_rs;
  const Elem* v;
  i64 v_rs;
  Elem* out;
  i64 out_rs;
  float* lse;
  i64 lse_rs;
  i64 m_first;
};

template <int HEAD_DIM, int BLOCK_N>
__device__ void forward(const Args& a) {
  constexpr int VEC = Ops::VEC, STRIDE = HEAD_DIM + VEC;
  constexpr int NTILES = BLOCK_N / 8;    // n8 tiles of S
  constexpr int DTILES = HEAD_DIM / 8;   // n8 tiles of O
  __shared__ __align__(16) Elem k_tile[BLOCK_N * STRIDE];
  __shared__ __align__(16) Elem v_tile[BLOCK_N * STRIDE];
  static_assert(EFF_WARPS == 4 && NTILES <= 16, "the keys seen: a uint4 of warps' words per thread of a group");
  // [t][warp], bit 2 nt + c: a row of the warp sees key nt * 8 + 2 t + c of this tile
  __shared__ __align__(16) u32 keys_seen[4][EFF_WARPS];
  // the bits of thread-in-group t's keys that some warp's row sees
  auto seen_by_block = [&](int t_) {
    const uint4 w = *reinterpret_cast<const uint4*>(keys_seen[t_]);
    return w.x | w.y | w.z | w.w;
  };
#if EFF_MASK_TILE
  typedef MaskTile<EFF_BLOCK_M, BLOCK_N> Tile;  // the block's rows x the tile's keys
  __shared__ __align__(16) unsigned char mask_tile[Tile::BYTES];
  auto stage_mask = [&](i64 n0) { Tile::stage(mask_tile, a.mask, a.m_first, a.vis.L, n0, a.vis.S); };
#endif

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;  // mma fragment coordinates: row group, thread in group
  const i64 row0 = a.m_first + warp * 16 + g;  // this thread's rows: row0 and row0 + 8
  const i64 m_last = min(a.vis.L, a.m_first + EFF_BLOCK_M) - 1;
  const bool vec = vectorizable<Ops>(a.k, a.k_rs, a.E) && vectorizable<Ops>(a.v, a.v_rs, a.Ev);

  // Q as A fragments, straight from global memory (once per block; any row stride).
  Ops::AFrag<HEAD_DIM> qf;
  Ops::load_a<HEAD_DIM>(qf, a.q, a.q_rs, row0, a.vis.L, a.E, t);
  const bool q_finite = held_finite<HEAD_DIM>(qf);

  float acc[DTILES][4];
#pragma unroll
  for (int d = 0; d < DTILES; ++d) acc[d][0] = acc[d][1] = acc[d][2] = acc[d][3] = 0.f;
  float m_i[2] = {-CUSDPA_INF, -CUSDPA_INF}, l_i[2] = {0.f, 0.f};  // rows row0, row0 + 8

  // Keys some row of the block may see.
  i64 lo, hi;
  a.vis.key_range(a.m_first, m_last + 1, lo, hi);
  const i64 n_begin = lo / BLOCK_N * BLOCK_N;

  if (n_begin < hi) {
    stage_tile<Ops, HEAD_DIM, BLOCK_N>(k_tile, a.k, a.k_rs, n_begin, a.vis.S, a.E, vec);
#if EFF_MASK_TILE
    stage_mask(n_begin);
#endif
    cp_async_commit();
  }
  for (i64 n0 = n_begin; n0 < hi; n0 += BLOCK_N) {
    const bool has_next = n0 + BLOCK_N < hi;
    stage_tile<Ops, HEAD_DIM, BLOCK_N>(v_tile, a.v, a.v_rs, n0, a.vis.S, a.Ev, vec);
    cp_async_commit();
    // Does every (row, key) pair of this tile pass? Then no per-element work and no V row zeroing.
    // Only the block's rows below L count: the rest hold zeros of Q and are never stored.
    const bool check = MASK_KIND != MASK_NONE || !a.vis.tile_full(a.m_first, m_last + 1 - a.m_first, n0, BLOCK_N);
    cp_async_wait<1>();  // K (and the mask) of this tile has landed (V may still be in flight)
    const bool k_finite = landed<Ops, HEAD_DIM, BLOCK_N>(k_tile);

    float s[NTILES][4];  // S = Q K^T
    EFF_SPLIT_BY(q_finite && k_finite, (Ops::product_abt<HEAD_DIM, NTILES, false, FAST>(s, qf, k_tile, lane)));

    // Scale, mask, and the online-softmax update, row by row (this thread holds 2 rows x 2 columns per n8 tile).
    float tile_max[2] = {-CUSDPA_INF, -CUSDPA_INF};
    u32 seen = 0;  // bit 2 nt + c: one of this thread's rows sees key nt * 8 + 2 t + c
    const PairVisibility pv(a.vis, row0, n0 + 2 * t);  // pairs (row0 + dr, n0 + 2 t + dc)
#pragma unroll
    for (int nt = 0; nt < NTILES; ++nt) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float v[2] = {s[nt][2 * r] * a.scale, s[nt][2 * r + 1] * a.scale};  // keys nt * 8 + 2 t, + 1
        if (check) {
#if EFF_MASK_TILE
          Tile::apply_pair(mask_tile, warp * 16 + g + r * 8, nt * 8 + 2 * t, v[0], v[1]);
#endif
#pragma unroll
          for (int c = 0; c < 2; ++c) {
#if EFF_MASK_TILE
            if (!pv.visible(r * 8, nt * 8 + c)) v[c] = -CUSDPA_INF;
#else
            v[c] = masked_score(pv, a.mask, row0, n0 + 2 * t, r * 8, nt * 8 + c, v[c]);
#endif
            if (v[c] != -CUSDPA_INF) seen |= 1u << (2 * nt + c);
          }
        }
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          s[nt][2 * r + c] = v[c];
          tile_max[r] = fmaxf(tile_max[r], v[c]);  // skips NaN: a NaN score poisons l_i through its p
        }
      }
    }
    if (check) {
      // A register and three shuffles (OR over the warp's 8 row groups), not a shared store per score (32 a tile a
      // thread, which the masked loops paid); here, before the exponentials, so that the compiler
      // may lift the barrier below above them, as it does where the keys are not tested, and the next K tile's
      // copies start early (after them, the unmasked forward ran 3-5% slower on the H100)
      seen |= __shfl_xor_sync(0xffffffffu, seen, 4);
      seen |= __shfl_xor_sync(0xffffffffu, seen, 8);
      seen |= __shfl_xor_sync(0xffffffffu, seen, 16);
      if (g == 0) keys_seen[t][warp] = seen;
    }
    float alpha[2], m_use[2], m_log2[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
      float m_new = fmaxf(m_i[r], tile_max[r]);
      m_use[r] = m_new == -CUSDPA_INF ? 0.f : m_new;  // a row with nothing visible yet keeps p = 0
      alpha[r] = exp2f((m_i[r] - m_use[r]) * LOG2E);
      m_log2[r] = __fmul_rn(m_use[r], LOG2E);
      m_i[r] = m_new;
      l_i[r] *= alpha[r];
    }
#pragma unroll
    for (int d = 0; d < DTILES; ++d) {
      acc[d][0] *= alpha[0];
      acc[d][1] *= alpha[0];
      acc[d][2] *= alpha[1];
      acc[d][3] *= alpha[1];
    }
    Ops::PFrag<NTILES> pf;  // P in the input type, as the A operand of P V
#pragma unroll
    for (int nt = 0; nt < NTILES; ++nt) {
      float p[4];
      // Both products rounded alone (rounding is monotonic, so m_log2 is the largest of them): the max
      // element gets exp2(0) = 1 exactly. The fmaf(s, LOG2E, -m_log2) the compiler would contract to is off
      // by up to half an ulp of s * LOG2E: thousands at |s| ~ 1e11 (q = k = 133120 in bf16), so exp2
      // overflows (inf / inf = NaN).
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        p[x] = exp2f(__fmul_rn(s[nt][x], LOG2E) - m_log2[x / 2]);
        l_i[x / 2] += p[x];  // the normaliser counts every visible key, dropped or not
      }
      if (DROPOUT) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          bool keep0, keep1;
          a.drop.keep_pair(a.bh, row0 + r * 8, n0 + nt * 8 + 2 * t, keep0, keep1);
          p[2 * r] = keep0 ? p[2 * r] * a.rescale : 0.f;
          p[2 * r + 1] = keep1 ? p[2 * r + 1] * a.rescale : 0.f;
        }
      }
      Ops::set_operand(pf, nt, p);
    }

    __syncthreads();  // every warp is done with this K tile (and this mask tile)
    if (has_next) {
      stage_tile<Ops, HEAD_DIM, BLOCK_N>(k_tile, a.k, a.k_rs, n0 + BLOCK_N, a.vis.S, a.E, vec);
#if EFF_MASK_TILE
      stage_mask(n0 + BLOCK_N);
#endif
      cp_async_commit();
      cp_async_wait<1>();  // V of this tile has landed (the next K may still be in flight)
    } else {
      cp_async_wait<0>();
    }
    // (non-finite values in rows no row sees, zeroed below, count too: the general split then, results alike)
    const bool v_finite = landed<Ops, HEAD_DIM, BLOCK_N>(v_tile);
    if (check) {
      // (a branch around the pass where every key is seen raised ptxas's spills at head dim 128: 124 -> 292 bytes)
      for (int c = threadIdx.x; c < BLOCK_N * (HEAD_DIM / VEC); c += EFF_THREADS) {
        const int r = c / (HEAD_DIM / VEC);  // key nt * 8 + 2 t + c of the tile
        if (!((seen_by_block((r % 8) / 2) >> (2 * (r / 8) + r % 2)) & 1)) {
#pragma unroll
          for (int x = 0; x < VEC; ++x) v_tile[r * STRIDE + (c % (HEAD_DIM / VEC)) * VEC + x] = Elem(0);
        }
      }
      __syncthreads();
    }

    // O += P V, V read back transposed
    EFF_SPLIT_BY(v_finite, (Ops::product_pb<HEAD_DIM, NTILES, HEAD_DIM, FAST>(acc, pf, v_tile, lane)));
    __syncthreads();  // every warp is done with this V tile before the next one is staged
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_i[r] += __shfl_xor_sync(0xffffffffu, l_i[r], 1);
    l_i[r] += __shfl_xor_sync(0xffffffffu, l_i[r], 2);
    const i64 row = row0 + r * 8;
    if (row >= a.vis.L) continue;
    // Decided by l_i, not m_i (fmaxf skips NaN, so an all-NaN row keeps m_i = -inf): l_i >= 1 on a row
    // that sees a finite score, NaN on one that sees NaN or +inf, 0 on one that sees nothing. That row
    // stores 0, not acc * 0: acc is NaN when a V row another row of the block sees holds NaN.
    const bool seen = l_i[r] != 0.f;
    const float inv = 1.f / l_i[r];
#pragma unroll
    for (int d = 0; d < DTILES; ++d) {
      const i64 col = d * 8 + 2 * t;
      Ops::store2(a.out + row * a.out_rs + col, col, a.Ev, seen ? acc[d][2 * r] * inv : 0.f,
                  seen ? acc[d][2 * r + 1] * inv : 0.f);
    }
    if (t == 0) a.lse[row * a.lse_rs] = seen ? m_i[r] + logf(l_i[r]) : -CUSDPA_INF;
  }
}

}  // namespace efficient

// The C-ABI entry the Numba kernel calls; EFF_NAME, EFF_HEAD_DIM, EFF_BLOCK_N, EFF_ELEM, EFF_DROPOUT and
// EFF_MASK_KIND are defined by kernels_numba.tensor_core in front of this source, one instantiation per module.
// It returns 0: Numba's C ABI lowers a void result to a pointer-sized one, which would not match.
extern "C" __device__ int EFF_NAME(
    unsigned long long q, long long q_rs, unsigned long long k, long long k_rs, unsigned long long v,
    long long v_rs, unsigned long long out, long long out_rs, unsigned long long lse, long long lse_rs,
    unsigned long long mask, long long mask_rs, long long mask_cs, long long m_first, long long L, long long S,
    long long E, long long Ev, long long shift, long long left, long long right, float scale, long long bh,
    long long seed_lo, long long seed_hi, long long offset, long long threshold, float rescale) {
  efficient::Args a;
  a.q = (const efficient::Elem*)q;
  a.q_rs = q_rs;
  a.k = (const efficient::Elem*)k;
  a.k_rs = k_rs;
  a.v = (const efficient::Elem*)v;
  a.v_rs = v_rs;
  a.out = (efficient::Elem*)out;
  a.out_rs = out_rs;
  a.lse = (float*)lse;
  a.lse_rs = lse_rs;
  a.m_first = m_first;
  a.set(mask, mask_rs, mask_cs, E, Ev, L, S, shift, left, right, scale, bh, seed_lo, seed_hi, offset, threshold,
        rescale);
  efficient::forward<EFF_HEAD_DIM, EFF_BLOCK_N>(a);
  return 0;
}
