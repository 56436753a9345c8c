// Pieces of the EFFICIENT backend's tensor_core tile loops (efficient_fwd.cuh, efficient_bwd.cuh): element
// conversions, the mask as the Numba caller hands it over (any strides, six element kinds), staging a
// tile of rows into shared memory for ldmatrix, and the two tile products on mma.sync. Like common.cuh, no
// headers: Numba links it through NVRTC.
//
// EFF_DROPOUT (0 or 1) and EFF_MASK_KIND (a MaskKind) come in front of the source with the head dim, one
// instantiation per problem kind, as FLASH's kernels take theirs: as run-time flags they left every element's
// mask switch and Philox rounds in the tile loops, which took the dk/dv loop at E = 64 to 27.5K SASS
// instructions (2.6K without), far past the instruction cache, on every path.
#pragma once
#include "common.cuh"

#define EFF_WARPS 4
#define EFF_THREADS (32 * EFF_WARPS)
#define EFF_BLOCK_M (16 * EFF_WARPS)  // rows of a block: 16 per warp

namespace efficient {

typedef unsigned short u16;
typedef unsigned long long u64;
typedef long long i64;

// Mask element kinds, as kernels_numba.tensor_core numbers them.
enum MaskKind { MASK_NONE = 0, MASK_BOOL = 1, MASK_F16 = 2, MASK_BF16 = 3, MASK_F32 = 4, MASK_F64 = 5 };

constexpr bool DROPOUT = EFF_DROPOUT != 0;
constexpr int MASK_KIND = EFF_MASK_KIND;

__device__ __forceinline__ float f16_to_f32(u16 h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __int_as_float(((u32)h) << 16); }

template <bool BF16>
__device__ __forceinline__ float to_f32(u16 h) { return BF16 ? bf16_to_f32(h) : f16_to_f32(h); }

// One (batch, head) slice's mask of kind MASK_KIND: element [i][j] at p + (i * rs + j * cs) * element size.
struct MaskView {
  const unsigned char* p;
  i64 rs, cs;
  // The mask applied to one scaled score of a visible pair; -inf means selected out. A -inf float-mask
  // entry selects the score out as a False bool entry does, so NaN in q k^T there is never added in.
  __device__ __forceinline__ float apply(i64 i, i64 j, float s) const {
    if (MASK_KIND == MASK_NONE) return s;
    i64 at = i * rs + j * cs;
    float m;
    switch (MASK_KIND) {
      case MASK_BOOL: return p[at] ? s : -CUSDPA_INF;
      case MASK_F16: m = f16_to_f32(((const u16*)p)[at]); break;
      case MASK_BF16: m = bf16_to_f32(((const u16*)p)[at]); break;
      case MASK_F32: m = ((const float*)p)[at]; break;
      default: m = (float)((const double*)p)[at];
    }
    return m == -CUSDPA_INF ? -CUSDPA_INF : s + m;
  }
};

// What every tile loop reads about its (batch, head) slice, from the C entry's scalars.
struct SliceArgs {
  MaskView mask;
  i64 E, Ev;
  Visibility<i64> vis;  // holds the slice's lengths L and S
  float scale;
  u32 bh;
  Dropout drop;
  float rescale;  // 1 / (1 - dropout_p)

  __device__ __forceinline__ void set(i64 mask_p, i64 mask_rs, i64 mask_cs, i64 E_, i64 Ev_, i64 L, i64 S, i64 shift,
                                      i64 left, i64 right, float scale_, i64 bh_, i64 seed_lo, i64 seed_hi,
                                      i64 offset, i64 threshold, float rescale_) {
    mask = MaskView{(const unsigned char*)mask_p, mask_rs, mask_cs};
    E = E_;
    Ev = Ev_;
    vis = Visibility<i64>{L, S, shift, left, right};
    scale = scale_;
    bh = (u32)bh_;
    drop = Dropout{(u32)seed_lo, (u32)seed_hi, (u32)offset, (u32)threshold};
    rescale = rescale_;
  }
};

// The visibility rule, then the mask.
__device__ __forceinline__ float masked_score(const Visibility<i64>& vis, const MaskView& mask, i64 i, i64 j,
                                              float s) {
  return vis.visible(i, j) ? mask.apply(i, j, s) : -CUSDPA_INF;
}

// Stages rows [n0, n0 + ROWS) of a row-major operand (row r at src + r * rs, unit stride along the head dim)
// into shared memory, row stride HEAD_DIM + 8 halves (the 16-byte pad spreads ldmatrix's eight row addresses
// over all 32 banks); zeros past row n_end and past column width. vec: 16-byte copies (cp.async) are legal.
template <int HEAD_DIM, int ROWS>
__device__ __forceinline__ void stage_tile(u16* tile, const u16* src, i64 rs, i64 n0, i64 n_end, i64 width,
                                           bool vec) {
  constexpr int STRIDE = HEAD_DIM + 8;
  constexpr int CHUNKS = HEAD_DIM / 8;
  for (int c = threadIdx.x; c < ROWS * CHUNKS; c += EFF_THREADS) {
    int r = c / CHUNKS, e = (c % CHUNKS) * 8;
    u16* dst = tile + r * STRIDE + e;
    bool row_ok = n0 + r < n_end;
    if (vec && e < width) {
      // width % 8 == 0 on this path, so a chunk is either wholly inside the head dim or wholly past it.
      const u16* g = src + (row_ok ? (n0 + r) * rs + e : 0);
      cp_async_16(dst, g, row_ok);
    } else {
#pragma unroll
      for (int x = 0; x < 8; ++x) dst[x] = (row_ok && e + x < width) ? src[(n0 + r) * rs + e + x] : (u16)0;
    }
  }
}

// The A fragments (m16n8k16, row-major 16 x 16 per k-step) of rows row0 and row0 + 8 (this thread's, t = lane
// % 4), straight from global memory (any row stride): zeros past row n_end and column width.
template <int KSTEPS>
__device__ __forceinline__ void load_a_fragments(u32 (&f)[KSTEPS][4], const u16* src, i64 rs, i64 row0, i64 n_end,
                                                 i64 width, int t) {
#pragma unroll
  for (int ks = 0; ks < KSTEPS; ++ks) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      i64 row = row0 + (r % 2) * 8;
      i64 col = ks * 16 + (r / 2) * 8 + 2 * t;
      u32 lo = (row < n_end && col < width) ? src[row * rs + col] : 0u;
      u32 hi = (row < n_end && col + 1 < width) ? src[row * rs + col + 1] : 0u;
      f[ks][r] = lo | (hi << 16);
    }
  }
}

// 16-byte copies of rows of `width` halves at `p`, row stride `rs` (halves), are legal.
__device__ __forceinline__ bool vectorizable(const void* p, i64 rs, i64 width) {
  return width % 8 == 0 && rs % 8 == 0 && (u64)p % 16 == 0;
}

// Acc[d] += A B for one warp's 16 rows: A the k-major fragments pf (2 registers per n8 tile of the reduced
// dimension, as the score products leave them), B a row-major [reduced][HEAD_DIM] tile read transposed.
template <int HEAD_DIM, int RTILES, bool BF16>
__device__ __forceinline__ void product_pb(float (&acc)[HEAD_DIM / 8][4], const u32 (&pf)[RTILES][2],
                                           const u16* tile, int lane) {
  constexpr int STRIDE = HEAD_DIM + 8;
  static_assert(RTILES % 2 == 0, "a reduced dimension of whole 16 rows");
#pragma unroll
  for (int kk = 0; kk < RTILES / 2; ++kk) {
    const u32 pa[4] = {pf[2 * kk][0], pf[2 * kk][1], pf[2 * kk + 1][0], pf[2 * kk + 1][1]};
#pragma unroll
    for (int d = 0; d < HEAD_DIM / 8; d += 2) {
      u32 b[4];
      ldmatrix_x4_trans(b, tile + (kk * 16 + (lane / 8 % 2) * 8 + lane % 8) * STRIDE + d * 8 + (lane / 16) * 8);
      mma_16816<BF16>(acc[d], pa, b[0], b[1]);
      mma_16816<BF16>(acc[d + 1], pa, b[2], b[3]);
    }
  }
}

// C[nt] += A B^T for one warp's 16 rows against the NT * 8 rows of a row-major tile (B^T's rows), A as
// register fragments over KSTEPS k-steps.
template <int HEAD_DIM, int NT, bool BF16>
__device__ __forceinline__ void product_abt(float (&c)[NT][4], const u32 (&af)[HEAD_DIM / 16][4], const u16* tile,
                                            int lane) {
  constexpr int STRIDE = HEAD_DIM + 8, KSTEPS = HEAD_DIM / 16;
  static_assert(KSTEPS % 2 == 0, "head dims of whole 32 columns");
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    c[nt][0] = c[nt][1] = c[nt][2] = c[nt][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ks += 2) {
      // four 8x8 matrices: tile rows nt*8.., head dims ks*16 + {0, 8, 16, 24}: B fragments of two k-steps
      u32 b[4];
      ldmatrix_x4(b, tile + (nt * 8 + lane % 8) * STRIDE + ks * 16 + (lane / 8) * 8);
      mma_16816<BF16>(c[nt], af[ks], b[0], b[1]);
      mma_16816<BF16>(c[nt], af[ks + 1], b[2], b[3]);
    }
  }
}

}  // namespace efficient
