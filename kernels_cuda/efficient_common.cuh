// Pieces of the EFFICIENT backend's tensor_core tile loops (efficient_fwd.cuh, efficient_bwd.cuh): the mask as
// the Numba caller hands it over (any strides, six element kinds), staging a tile of rows into shared memory,
// and the element families the loops are written over (Ops below: the input type, its fragments and the tile
// products on mma.sync). Like common.cuh, no headers: Numba links it through NVRTC.
//
// EFF_ELEM picks the family, one per module: 0 float16 and 1 bfloat16 (m16n8k16, fragments through ldmatrix),
// 2 float32 and 3 float32 allowed TF32 (m16n8k8 on TF32; 2 splits each operand into a TF32 "big" part and a
// TF32 "small" remainder and adds small*big + big*small + big*big, three MMAs whose operands keep 22 of
// fp32's 24 bits (within 2^-23 relative, fp32 rounds within 2^-24) -- what PyTorch's EFFICIENT_ATTENTION
// computes fp32 with, CUTLASS's OpMultiplyAddFastF32 -- and 3
// takes one MMA of the big parts, TF32's 10-bit mantissa, when the caller allowed it).
//
// EFF_DROPOUT (0 or 1) and EFF_MASK_KIND (a MaskKind) come in front of the source with the head dim, one
// instantiation per problem kind, as FLASH's kernels take theirs: as run-time flags they left every element's
// mask switch and Philox rounds in the tile loops, which took the dk/dv loop at E = 64 to 27.5K SASS
// instructions (2.6K without), far past the instruction cache, on every path.
//
// EFF_FAST_SPLIT (float32 only; KernelConfig.tensor_core_fp32_fast_split): every staged tile says when it lands
// whether all its elements are finite (landed), each warp whether its held fragments are (held_finite), and the
// products split finite operands without the non-finite cases (Tf32Ops::split), 4 instructions an element where
// those cases take 9, the same bits.
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

enum ElemKind { ELEM_F16 = 0, ELEM_BF16 = 1, ELEM_F32 = 2, ELEM_TF32 = 3 };

__device__ __forceinline__ float f16_to_f32(u16 h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __int_as_float(((u32)h) << 16); }

__host__ __device__ constexpr int mask_element_bytes(int kind) {
  return kind == MASK_F64 ? 8 : kind == MASK_F32 ? 4 : (kind == MASK_F16 || kind == MASK_BF16) ? 2 : 1;
}

// exp2f's own instruction (ex2.approx.f32, subnormal results kept: the same bits), issued where it stands. The
// backward's loops select away the exponential of a score no row takes; with exp2f the compiler sank it into a
// branch a score (BSSY/BSYNC around it), which cost more than the exponential and kept the scores' exponentials
// from overlapping.
__device__ __forceinline__ float exp2_always(float x) {
  float y;
  asm volatile("ex2.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Mask element `at` (in elements) of kind MASK_KIND from `p` applied to one scaled score of a visible pair; -inf
// means selected out. A -inf float-mask entry selects the score out as a False bool entry does, so NaN in q k^T
// there is never added in. The add is __fadd_rn, which the compiler never contracts with the scaling multiply
// in front of it: a plain `s + m` became fma(qk, scale, m) where the multiply and the add landed in one basic
// block (the per-element loads) and stayed two roundings where they did not (EFF_MASK_TILE's select between
// the shared tile and the global fallback), so the two paths, and the forward and the backward's recomputed
// scores, could differ in the last bit. Pinned, every loop computes (qk * scale rounded) + m rounded, as the
// yardstick's recipe does.
__device__ __forceinline__ float add_mask(float s, float m) { return m == -CUSDPA_INF ? -CUSDPA_INF : __fadd_rn(s, m); }

__device__ __forceinline__ float apply_mask_element(const unsigned char* p, i64 at, float s) {
  if (MASK_KIND == MASK_NONE) return s;
  float m;
  switch (MASK_KIND) {
    case MASK_BOOL: return p[at] ? s : -CUSDPA_INF;
    case MASK_F16: m = f16_to_f32(((const u16*)p)[at]); break;
    case MASK_BF16: m = bf16_to_f32(((const u16*)p)[at]); break;
    case MASK_F32: m = ((const float*)p)[at]; break;
    default: m = (float)((const double*)p)[at];
  }
  return add_mask(s, m);
}

// Mask elements 0 and 1 at `p` (aligned to two elements) applied to two scores as apply_mask_element does, both
// read by one load: a thread's two adjacent keys of an n8 tile, whose elements one byte (or half, or float)
// load apiece took twice the shared loads, each behind its own visibility predicate.
__device__ __forceinline__ void apply_mask_pair(const unsigned char* p, float& s0, float& s1) {
  switch (MASK_KIND) {
    case MASK_NONE: return;
    case MASK_BOOL: {
      const u32 w = *(const u16*)p;
      s0 = (w & 0xffu) ? s0 : -CUSDPA_INF;
      s1 = (w & 0xff00u) ? s1 : -CUSDPA_INF;
      return;
    }
    case MASK_F16:
    case MASK_BF16: {
      const u32 w = *(const u32*)p;
      const bool bf = MASK_KIND == MASK_BF16;
      s0 = add_mask(s0, bf ? bf16_to_f32((u16)(w & 0xffffu)) : f16_to_f32((u16)(w & 0xffffu)));
      s1 = add_mask(s1, bf ? bf16_to_f32((u16)(w >> 16)) : f16_to_f32((u16)(w >> 16)));
      return;
    }
    case MASK_F32: {
      const float2 m = *(const float2*)p;
      s0 = add_mask(s0, m.x);
      s1 = add_mask(s1, m.y);
      return;
    }
    default: {
      const double2 m = *(const double2*)p;
      s0 = add_mask(s0, (float)m.x);
      s1 = add_mask(s1, (float)m.y);
    }
  }
}

// One (batch, head) slice's mask of kind MASK_KIND: element [i][j] at p + (i * rs + j * cs) * element size.
struct MaskView {
  const unsigned char* p;
  i64 rs, cs;
  __device__ __forceinline__ float apply(i64 i, i64 j, float s) const {
    return apply_mask_element(p, i * rs + j * cs, s);
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

// A tile of the slice's mask in shared memory (EFF_MASK_TILE): ROWS rows from i0 by COLS keys from j0, rows of
// ROW_BYTES (+16: a warp's reads of 8 rows spread over the banks), copied with 16-byte cp.async where the mask
// is `tileable` (its rows contiguous along the keys and 16-byte aligned, the keys a whole number of chunks, so a
// chunk is wholly inside the keys or wholly past them), else element by element (any strides: broadcast keys,
// rows that are not aligned); rows past L and keys past S are zero-filled, never read (their pairs are not
// visible). The tile loops copy a tile with the operand tiles it goes with and read every score's element from
// it: one path a score, where a select between the tile and global memory cost a branch a score.
template <int ROWS, int COLS>
struct MaskTile {
  static constexpr int MB = mask_element_bytes(MASK_KIND), CHUNKS = COLS * MB / 16, ROW_BYTES = COLS * MB + 16;
  static constexpr int BYTES = ROWS * ROW_BYTES;
  static_assert(MASK_KIND != MASK_NONE && COLS * MB % 16 == 0, "a mask tile's rows are whole 16-byte chunks");

  static __device__ __forceinline__ bool tileable(const MaskView& m, i64 S) {
    return m.cs == 1 && (m.rs * MB) % 16 == 0 && (u64)m.p % 16 == 0 && (S * MB) % 16 == 0;
  }
  static __device__ __forceinline__ void stage(unsigned char* tile, const MaskView& m, i64 i0, i64 L, i64 j0, i64 S) {
    if (tileable(m, S)) {
      for (int c = threadIdx.x; c < ROWS * CHUNKS; c += EFF_THREADS) {
        const int r = c / CHUNKS, ch = c % CHUNKS;
        const i64 i = i0 + r, j = j0 + ch * (16 / MB);
        const bool inside = i < L && j < S;
        cp_async_16(tile + r * ROW_BYTES + ch * 16, inside ? m.p + (i * m.rs + j) * MB : m.p, inside);
      }
    } else {
      // plain loads and stores: the callers stage while no warp reads the tile, as for the cp.async copies
      for (int e = threadIdx.x; e < ROWS * COLS; e += EFF_THREADS) {
        const int r = e / COLS, c = e % COLS;
        const i64 i = i0 + r, j = j0 + c;
        copy_element(tile + r * ROW_BYTES + c * MB, i < L && j < S ? m.p + (i * m.rs + j * m.cs) * MB : nullptr);
      }
    }
  }
  // one element of MB bytes (its natural alignment), or zero where src is null
  static __device__ __forceinline__ void copy_element(unsigned char* dst, const unsigned char* src) {
    switch (MB) {
      case 1: *dst = src ? *src : 0; break;
      case 2: *(u16*)dst = src ? *(const u16*)src : 0; break;
      case 4: *(u32*)dst = src ? *(const u32*)src : 0u; break;
      default: *(u64*)dst = src ? *(const u64*)src : 0ull;
    }
  }
  // the mask applied to the score of pair (i0 + r, j0 + col), visible or not (the caller's rule says which)
  static __device__ __forceinline__ float apply(const unsigned char* tile, int r, int col, float s) {
    return apply_mask_element(tile + r * ROW_BYTES, col, s);
  }
  // ... to the scores of pairs (i0 + r, j0 + col) and (i0 + r, j0 + col + 1), col even: one load of both
  static __device__ __forceinline__ void apply_pair(const unsigned char* tile, int r, int col, float& s0, float& s1) {
    apply_mask_pair(tile + r * ROW_BYTES + col * MB, s0, s1);
  }
};

// The visibility rule for the pairs (i0 + dr, j0 + dc) a thread holds of a tile, dr and dc small non-negative
// offsets that the unrolled tile loops know at compile time: four 32-bit compares against limits set once a
// tile, where Visibility::visible's 64-bit indices and band took about 15 instructions a score, on every score
// of a masked tile. The limits are clamped into [-FAR, FAR], past any offset a tile has, to fit 32 bits.
struct PairVisibility {
  static constexpr i64 FAR = 1 << 20;
  int rows, keys, lo, hi;  // visible iff dr < rows, dc < keys and lo <= dc - dr <= hi

  static __device__ __forceinline__ int clamp(i64 x) { return (int)max(-FAR, min(FAR, x)); }
  __device__ __forceinline__ PairVisibility(const Visibility<i64>& vis, i64 i0, i64 j0) {
    const i64 base = j0 - i0 - vis.shift;  // j - i - shift = base + dc - dr
    rows = clamp(vis.L - i0);
    keys = clamp(vis.S - j0);
    lo = vis.left < 0 ? -(int)FAR : clamp(-vis.left - base);
    hi = vis.right < 0 ? (int)FAR : clamp(vis.right - base);
  }
  __device__ __forceinline__ bool visible(int dr, int dc) const {
    return dr < rows && dc < keys && dc - dr >= lo && dc - dr <= hi;
  }
};

// The visibility rule, then the mask, for pair (i0 + dr, j0 + dc).
__device__ __forceinline__ float masked_score(const PairVisibility& pv, const MaskView& mask, i64 i0, i64 j0, int dr,
                                              int dc, float s) {
  return pv.visible(dr, dc) ? mask.apply(i0 + dr, j0 + dc, s) : -CUSDPA_INF;
}

// p[0] += x in global memory, atomically. atomicAdd on a generic pointer that the compiler cannot place (a loop
// called through the ABI) also compiles a compare-and-swap loop for shared memory and a load and store for local
// memory into every loop that adds (nvcc 13.0).
__device__ __forceinline__ void red_add1(float* p, float x) {
  asm volatile("red.global.add.f32 [%0], %1;\n" ::"l"(p), "f"(x) : "memory");
}

// p[0..1] += (x, y) in global memory, atomically (p 8-byte aligned): one vector reduction on sm_90.
__device__ __forceinline__ void red_add2(float* p, float x, float y) {
#if __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(p), "f"(x), "f"(y) : "memory");
#else
  red_add1(p, x);
  red_add1(p + 1, y);
#endif
}

// p[0..3] += (x, y, z, w) in global memory, atomically (p 16-byte aligned): one vector reduction on sm_90.
__device__ __forceinline__ void red_add4(float* p, float x, float y, float z, float w) {
#if __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "f"(x), "f"(y), "f"(z), "f"(w)
               : "memory");
#else
  red_add1(p, x);
  red_add1(p + 1, y);
  red_add1(p + 2, z);
  red_add1(p + 3, w);
#endif
}

// Stages rows [n0, n0 + ROWS) of a row-major operand (row r at src + r * rs, unit stride along the head dim)
// into shared memory, row stride HEAD_DIM + Ops::VEC elements (the 16-byte pad spreads the rows of one
// fragment load over all 32 banks); zeros past row n_end and past column width. vec: 16-byte copies
// (cp.async) are legal.
template <class Ops, int HEAD_DIM, int ROWS>
__device__ __forceinline__ void stage_tile(typename Ops::Elem* tile, const typename Ops::Elem* src, i64 rs, i64 n0,
                                           i64 n_end, i64 width, bool vec) {
  typedef typename Ops::Elem Elem;
  constexpr int VEC = Ops::VEC, STRIDE = HEAD_DIM + VEC, CHUNKS = HEAD_DIM / VEC;
  for (int c = threadIdx.x; c < ROWS * CHUNKS; c += EFF_THREADS) {
    int r = c / CHUNKS, e = (c % CHUNKS) * VEC;
    Elem* dst = tile + r * STRIDE + e;
    bool row_ok = n0 + r < n_end;
    if (vec && e < width) {
      // width % VEC == 0 on this path, so a chunk is either wholly inside the head dim or wholly past it.
      const Elem* g = src + (row_ok ? (n0 + r) * rs + e : 0);
      cp_async_16(dst, g, row_ok);
    } else {
#pragma unroll
      for (int x = 0; x < VEC; ++x) dst[x] = (row_ok && e + x < width) ? src[(n0 + r) * rs + e + x] : Elem(0);
    }
  }
}

// The barrier after staged tiles have landed (this thread waited for its copies). With EFF_FAST_SPLIT it also says
// whether every element of the ROWS x HEAD_DIM tiles at `a` (and `b`) is finite: each thread reads back its own
// share (stage_tile's), which its wait made visible to it, and the barrier ANDs the answers. Else false.
template <class Ops, int HEAD_DIM, int ROWS>
__device__ __forceinline__ bool landed(const typename Ops::Elem* a, const typename Ops::Elem* b = nullptr) {
#if EFF_FAST_SPLIT
  static_assert(Ops::VEC == 4, "fp32 tiles: four elements in a 16-byte chunk");
  constexpr int STRIDE = HEAD_DIM + Ops::VEC, CHUNKS = HEAD_DIM / Ops::VEC;
  u32 widest = 0;  // of the magnitudes' bits: non-finite ones from 0x7f800000 on
  for (int tile = 0; tile < (b == nullptr ? 1 : 2); ++tile) {
    const typename Ops::Elem* base = tile == 0 ? a : b;
    for (int c = threadIdx.x; c < ROWS * CHUNKS; c += EFF_THREADS) {
      const uint4 w = *reinterpret_cast<const uint4*>(base + (c / CHUNKS) * STRIDE + (c % CHUNKS) * Ops::VEC);
      widest = max(max(widest, max(w.x & 0x7fffffffu, w.y & 0x7fffffffu)), max(w.z & 0x7fffffffu, w.w & 0x7fffffffu));
    }
  }
  return __syncthreads_and(widest < 0x7f800000u);
#else
  __syncthreads();
  return false;
#endif
}

// `call` (a parenthesised product whose template arguments end with FAST) on tiles that landed finite or not:
// both instantiations of Tf32Ops' split with EFF_FAST_SPLIT, the general one alone without.
#if EFF_FAST_SPLIT
#define EFF_SPLIT_BY(fast, call)    \
  do {                              \
    if (fast) {                     \
      constexpr bool FAST = true;   \
      call;                         \
    } else {                        \
      constexpr bool FAST = false;  \
      call;                         \
    }                               \
  } while (0)
#else
#define EFF_SPLIT_BY(fast, call) \
  do {                           \
    constexpr bool FAST = false; \
    call;                        \
  } while (0)
#endif

// 16-byte copies of rows of `width` elements at `p`, row stride `rs` (elements), are legal.
template <class Ops>
__device__ __forceinline__ bool vectorizable(const void* p, i64 rs, i64 width) {
  return width % Ops::VEC == 0 && rs % Ops::VEC == 0 && (u64)p % 16 == 0;
}

// ---- float16 / bfloat16: m16n8k16, two elements per 32-bit register ----------------------------------------

template <bool BF16>
struct HalfOps {
  typedef u16 Elem;
  static constexpr int VEC = 8;  // elements per 16-byte copy, and the shared tiles' row pad
  // A operands of m16n8k16 for 16 rows: 4 registers per k-step of 16 columns, as the mma takes them.
  template <int HEAD_DIM>
  struct AFrag {
    u32 r[HEAD_DIM / 16][4];
  };
  // P or dS of 16 rows by NT n8 tiles as the A operand of a product over those columns, packed to Elem.
  template <int NT>
  struct PFrag {
    u32 r[NT][2];
  };

  static __device__ __forceinline__ float to_f32(u16 h) { return BF16 ? bf16_to_f32(h) : f16_to_f32(h); }

  // The 32-bit word w of two elements with each non-finite one (exponent bits all ones) made 0.
  static __device__ __forceinline__ u32 finite_part(u32 w) {
    const u32 ones = BF16 ? 0x7f80u : 0x7c00u;
    const u32 lo = (w & ones) == ones ? 0u : (w & 0xffffu);
    const u32 hi = ((w >> 16) & ones) == ones ? 0u : (w & 0xffff0000u);
    return lo | hi;
  }

  // (lo, hi) rounded to Elem into dst[0] and dst[1], those of columns col and col + 1 below width.
  static __device__ __forceinline__ void store2(u16* dst, i64 col, i64 width, float lo, float hi) {
    const u32 two = pack2<BF16>(lo, hi);
    if (col < width) dst[0] = (u16)(two & 0xffffu);
    if (col + 1 < width) dst[1] = (u16)(two >> 16);
  }

  // n8 tile nt of a C-layout accumulator (p: rows g, g + 8 x columns 2t, 2t + 1) as A operand columns: the
  // m16n8k16 A layout holds the same pairs, so P V needs no data movement.
  template <int NT>
  static __device__ __forceinline__ void set_operand(PFrag<NT>& f, int nt, const float (&p)[4]) {
    f.r[nt][0] = pack2<BF16>(p[0], p[1]);
    f.r[nt][1] = pack2<BF16>(p[2], p[3]);
  }

  // The A fragments of rows row0 and row0 + 8 (this thread's, t = lane % 4), straight from global memory
  // (any row stride): zeros past row n_end and column width.
  template <int HEAD_DIM>
  static __device__ __forceinline__ void load_a(AFrag<HEAD_DIM>& f, const u16* src, i64 rs, i64 row0, i64 n_end,
                                                i64 width, int t) {
#pragma unroll
    for (int ks = 0; ks < HEAD_DIM / 16; ++ks) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        i64 row = row0 + (r % 2) * 8;
        i64 col = ks * 16 + (r / 2) * 8 + 2 * t;
        u32 lo = (row < n_end && col < width) ? src[row * rs + col] : 0u;
        u32 hi = (row < n_end && col + 1 < width) ? src[row * rs + col + 1] : 0u;
        f.r[ks][r] = lo | (hi << 16);
      }
    }
  }

  // C[nt] = A B^T for one warp's 16 rows against the NT * 8 rows of a row-major tile (B^T's rows), A as
  // register fragments. SWAPPED orders Tf32Ops' split products, FAST says its tile landed finite; one MMA per
  // product here has neither to do.
  template <int HEAD_DIM, int NT, bool SWAPPED = false, bool FAST = false>
  static __device__ __forceinline__ void product_abt(float (&c)[NT][4], const AFrag<HEAD_DIM>& a, const u16* tile,
                                                     int lane) {
    constexpr int STRIDE = HEAD_DIM + VEC, KSTEPS = HEAD_DIM / 16;
    static_assert(KSTEPS % 2 == 0, "head dims of whole 32 columns");
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      c[nt][0] = c[nt][1] = c[nt][2] = c[nt][3] = 0.f;
#pragma unroll
      for (int ks = 0; ks < KSTEPS; ks += 2) {
        // four 8x8 matrices: tile rows nt*8.., head dims ks*16 + {0, 8, 16, 24}: B fragments of two k-steps
        u32 b[4];
        ldmatrix_x4(b, tile + (nt * 8 + lane % 8) * STRIDE + ks * 16 + (lane / 8) * 8);
        mma_16816<BF16>(c[nt], a.r[ks], b[0], b[1]);
        mma_16816<BF16>(c[nt], a.r[ks + 1], b[2], b[3]);
      }
    }
  }

  // The same with A the 16 rows of a shared tile at a_rows (row-major, the tile's stride).
  template <int HEAD_DIM, int NT, bool SWAPPED = false, bool FAST = false>
  static __device__ __forceinline__ void product_abt_shared(float (&c)[NT][4], const u16* a_rows, const u16* tile,
                                                            int lane) {
    constexpr int STRIDE = HEAD_DIM + VEC;
    static_assert(NT % 2 == 0, "B fragments are read two n8 tiles at a time");
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) c[nt][0] = c[nt][1] = c[nt][2] = c[nt][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < HEAD_DIM / 16; ++ks) {
      u32 af[4];
      ldmatrix_x4(af, a_rows + ((lane / 8 % 2) * 8 + lane % 8) * STRIDE + ks * 16 + (lane / 16) * 8);
#pragma unroll
      for (int nt = 0; nt < NT; nt += 2) {
        // tile rows nt*8.. and (nt+1)*8.., head dims ks*16 + {0, 8}: B fragments of two n8 tiles
        u32 b[4];
        ldmatrix_x4(b, tile + (nt * 8 + (lane / 16) * 8 + lane % 8) * STRIDE + ks * 16 + (lane / 8 % 2) * 8);
        mma_16816<BF16>(c[nt], af, b[0], b[1]);
        mma_16816<BF16>(c[nt + 1], af, b[2], b[3]);
      }
    }
  }

  // Acc[d] += A B for one warp's 16 rows: A the fragments pf over RT n8 tiles of the reduced dimension, B a
  // row-major [reduced][HEAD_DIM] tile read transposed, COLS of its columns from `tile` on (a column part).
  template <int HEAD_DIM, int RT, int COLS = HEAD_DIM, bool FAST = false>
  static __device__ __forceinline__ void product_pb(float (&acc)[COLS / 8][4], const PFrag<RT>& pf,
                                                    const u16* tile, int lane) {
    constexpr int STRIDE = HEAD_DIM + VEC;
    static_assert(RT % 2 == 0 && COLS % 16 == 0, "a reduced dimension of whole 16 rows, whole 16 columns");
#pragma unroll
    for (int kk = 0; kk < RT / 2; ++kk) {
      const u32 pa[4] = {pf.r[2 * kk][0], pf.r[2 * kk][1], pf.r[2 * kk + 1][0], pf.r[2 * kk + 1][1]};
#pragma unroll
      for (int d = 0; d < COLS / 8; d += 2) {
        u32 b[4];
        ldmatrix_x4_trans(b, tile + (kk * 16 + (lane / 8 % 2) * 8 + lane % 8) * STRIDE + d * 8 + (lane / 16) * 8);
        mma_16816<BF16>(acc[d], pa, b[0], b[1]);
        mma_16816<BF16>(acc[d + 1], pa, b[2], b[3]);
      }
    }
  }
};

// ---- float32: m16n8k8 on TF32, one element per register --------------------------------------------------
//
// Fragments hold raw fp32 values and are split into TF32 parts where a product uses them (each A part once
// per k-step, each B element once per load), so Q, K and dO stay one register per element. The fragment
// loads are scalar shared-memory reads: with the row stride HEAD_DIM + 4 (HEAD_DIM a multiple of 32), the
// rows-by-columns patterns below, (g, t) and (2t, g), meet 32 different banks.

// PINNED: the conversion stays where it is written (volatile). The A fragments held in registers for the whole
// tile loop (Q, dO, K) are split per k-step where they are used: a hoistable split is taken out of the loop
// by the compiler, doubling those fragments' registers (the fp32 dq loop at head dim 64 spilled 228 bytes at
// 255 registers so).
template <bool PINNED = false>
__device__ __forceinline__ u32 to_tf32(float x) {
  u32 r;
  if (PINNED)
    asm volatile("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  else
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ void mma_1688_tf32(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <int PASSES>
struct Tf32Ops {
  static_assert(PASSES == 1 || PASSES == 3, "one TF32 product, or three of split operands");
  typedef float Elem;
  static constexpr int VEC = 4;
  // A operands of m16n8k8 for 16 rows: per k-step of 8 columns, (row g, col t), (g + 8, t), (g, t + 4),
  // (g + 8, t + 4).
  template <int HEAD_DIM>
  struct AFrag {
    float r[HEAD_DIM / 8][4];
  };
  // P or dS as A operands, one k-step of 8 columns per n8 tile (set_operand says in which order).
  template <int NT>
  struct PFrag {
    float r[NT][4];
  };
  // An operand split into TF32 parts: x ~ big + small (small unused with one pass); cross is big where x is
  // finite and 0 where not, the factor of x in the small terms: there an inf x meeting the other operand's
  // small part of 0 would make 0 * inf = NaN where x's product is +-inf (a V row of inf under P > 0).
  struct Split {
    u32 big, small, cross;
  };

  // big = x rounded to TF32, small = x - big (exact) truncated to TF32: a split of big + small gives big and
  // small back (rounding small instead could reach half an ulp of big, and big + small then round to another
  // big), so an output that is one value row's big + small (a row that sees one key) splits as that row
  // did, which backward_dq's D relies on.
  // FAST: x is finite (its tile landed so, or its held fragments are: held_finite), where cvt.rna.tf32 is
  // (bits + 0x1000) & ~0x1fff and x - big is not NaN (-inf where big rounded up to inf, as below): the same three
  // parts in 4 instructions.
  template <bool PINNED = false, bool FAST = false>
  static __device__ __forceinline__ Split split(float x) {
    Split s;
    if (FAST && PASSES == 3) {
      u32 bits = __float_as_uint(x);
      if (PINNED)
        asm volatile("add.u32 %0, %0, 4096;" : "+r"(bits));
      else
        bits += 0x1000u;
      s.big = bits & 0xffffe000u;
      s.small = __float_as_uint(x - __uint_as_float(s.big)) & 0xffffe000u;
      s.cross = s.big;
      return s;
    }
    s.big = to_tf32<PINNED>(x);
    if (PASSES == 3) {
      // NaN only where x is +-inf or NaN, whose big part alone carries it into big * big
      const float rest = x - __uint_as_float(s.big);
      const bool finite = rest == rest;
      s.small = __float_as_uint(finite ? rest : 0.f) & 0xffffe000u;
      s.cross = finite ? s.big : 0u;
    }
    return s;
  }

  // D += A B on split operands is small_term 0, small_term 1, then big_term (the dropped small * small is below
  // fp32's rounding); the callers take each pass across several products before the next, each D its terms in
  // this order. The small terms go in the order of the products, not of the operands' roles: (a small, b big)
  // then (a big, b small), or with SWAPPED, where a and b hold the operands of the other kernels' product the
  // other way round (the dk/dv kernel's K Q^T and V dO^T), (a big, b small) first: every product then sums the
  // same terms in the same order, so dP^T there equals dP and D where a row sees one key.
  template <bool SWAPPED>
  static __device__ __forceinline__ void small_term(float (&d)[4], const Split (&a)[4], const Split& b0,
                                                    const Split& b1, int pass) {
    if ((pass == 0) == SWAPPED)
      mma_1688_tf32(d, a[0].cross, a[1].cross, a[2].cross, a[3].cross, b0.small, b1.small);
    else
      mma_1688_tf32(d, a[0].small, a[1].small, a[2].small, a[3].small, b0.cross, b1.cross);
  }

  // big * big: the whole product with one pass
  static __device__ __forceinline__ void big_term(float (&d)[4], const Split (&a)[4], const Split& b0,
                                                  const Split& b1) {
    mma_1688_tf32(d, a[0].big, a[1].big, a[2].big, a[3].big, b0.big, b1.big);
  }

  static __device__ __forceinline__ float to_f32(float x) { return x; }

  static __device__ __forceinline__ u32 finite_part(u32 w) { return (w & 0x7f800000u) == 0x7f800000u ? 0u : w; }

  static __device__ __forceinline__ void store2(float* dst, i64 col, i64 width, float lo, float hi) {
    if (col < width) dst[0] = lo;
    if (col + 1 < width) dst[1] = hi;
  }

  // The C layout's columns 2t and 2t + 1 become the A layout's columns t and t + 4: the k-step's 8 columns
  // are taken in the order 0, 2, 4, 6, 1, 3, 5, 7, and product_pb reads B's rows in that order.
  template <int NT>
  static __device__ __forceinline__ void set_operand(PFrag<NT>& f, int nt, const float (&p)[4]) {
    f.r[nt][0] = p[0];
    f.r[nt][1] = p[2];
    f.r[nt][2] = p[1];
    f.r[nt][3] = p[3];
  }

  template <int HEAD_DIM>
  static __device__ __forceinline__ void load_a(AFrag<HEAD_DIM>& f, const float* src, i64 rs, i64 row0, i64 n_end,
                                                i64 width, int t) {
#pragma unroll
    for (int ks = 0; ks < HEAD_DIM / 8; ++ks) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const i64 row = row0 + (r % 2) * 8, col = ks * 8 + (r / 2) * 4 + t;
        f.r[ks][r] = (row < n_end && col < width) ? src[row * rs + col] : 0.f;
      }
    }
  }

  // acc[n0 + j] += A B_j for the w (1 or 2) n8 tiles j of one k-step: A split as `as`, B_j as b0[j], b1[j].
  // With three passes each tile's terms go into a zeroed fragment, in small_term's order (so every product sums
  // the same terms in the same order: SWAPPED's bits), and are added to acc by FADD. The tensor cores add into
  // their accumulator truncating, a bias that grows with the number of additions: a k-step's three terms chained
  // into acc for every k-step, as the score products took them (3 * HEAD_DIM / 8 additions a score, the small
  // terms' into its full magnitude), made dq's error 7-11x the fp32 yardstick's (median of
  // benchmarks/tf32_error_model.py at L = 97 S = 130, head dims 64 and 128), 1.4-1.5x this way; and dV over 1025
  // queries of one key was 20x on the H200 before product_pb took its FADDs. The two tiles take their passes in
  // turn, so each mma has the other tile's between it and the next on the same fragment: on the H100 fp32 head
  // dim 128 +2-3% forward and backward, 96 forward +10-12%, 32 and 64 the same (product_pb; BENCHMARKS.md).
  template <bool SWAPPED, int N>
  static __device__ __forceinline__ void add_kstep(float (&acc)[N][4], int n0, int w, const Split (&as)[4],
                                                   const Split (&b0)[2], const Split (&b1)[2]) {
    if (PASSES == 3) {
      float step[2][4] = {};
#pragma unroll
      for (int pass = 0; pass < 2; ++pass)
#pragma unroll
        for (int j = 0; j < w; ++j) small_term<SWAPPED>(step[j], as, b0[j], b1[j], pass);
#pragma unroll
      for (int j = 0; j < w; ++j) {
        big_term(step[j], as, b0[j], b1[j]);
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[n0 + j][i] += step[j][i];
      }
    } else {
#pragma unroll
      for (int j = 0; j < w; ++j) big_term(acc[n0 + j], as, b0[j], b1[j]);
    }
  }

  // C[nt] += A B^T for one k-step: a this thread's 4 A values, B^T the tile's rows nt * 8 + g, a pair of n8
  // tiles at a time (add_kstep; the B splits held are two tiles'). A_FAST, B_FAST: A's four values, the tile
  // (B), are finite (Tf32Ops::split).
  template <int HEAD_DIM, int NT, bool SWAPPED, bool A_FAST, bool B_FAST>
  static __device__ __forceinline__ void abt_kstep(float (&c)[NT][4], const float (&a)[4], const float* tile, int ks,
                                                   int lane) {
    constexpr int STRIDE = HEAD_DIM + VEC;
    const int g = lane / 4, t = lane % 4;
    const Split as[4] = {split<true, A_FAST>(a[0]), split<true, A_FAST>(a[1]), split<true, A_FAST>(a[2]),
                         split<true, A_FAST>(a[3])};
#pragma unroll
    for (int n0 = 0; n0 < NT; n0 += 2) {
      const int w = NT - n0 < 2 ? 1 : 2;  // n8 tiles of this step (known once unrolled)
      Split b0[2], b1[2];
#pragma unroll
      for (int j = 0; j < w; ++j) {
        const float* b = tile + ((n0 + j) * 8 + g) * STRIDE + ks * 8 + t;
        b0[j] = split<false, B_FAST>(b[0]);
        b1[j] = split<false, B_FAST>(b[4]);
      }
      add_kstep<SWAPPED>(c, n0, w, as, b0, b1);
    }
  }

  // FAST: the held fragments a and the tile are finite.
  template <int HEAD_DIM, int NT, bool SWAPPED = false, bool FAST = false>
  static __device__ __forceinline__ void product_abt(float (&c)[NT][4], const AFrag<HEAD_DIM>& a, const float* tile,
                                                     int lane) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) c[nt][0] = c[nt][1] = c[nt][2] = c[nt][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < HEAD_DIM / 8; ++ks) abt_kstep<HEAD_DIM, NT, SWAPPED, FAST, FAST>(c, a.r[ks], tile, ks, lane);
  }

  // FAST: the tile is finite (a_rows' values are split in full).
  template <int HEAD_DIM, int NT, bool SWAPPED = false, bool FAST = false>
  static __device__ __forceinline__ void product_abt_shared(float (&c)[NT][4], const float* a_rows, const float* tile,
                                                            int lane) {
    constexpr int STRIDE = HEAD_DIM + VEC;
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) c[nt][0] = c[nt][1] = c[nt][2] = c[nt][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < HEAD_DIM / 8; ++ks) {
      const float* a = a_rows + g * STRIDE + ks * 8 + t;
      const float af[4] = {a[0], a[8 * STRIDE], a[4], a[8 * STRIDE + 4]};
      abt_kstep<HEAD_DIM, NT, SWAPPED, false, FAST>(c, af, tile, ks, lane);
    }
  }

  // Acc[d] += A B: A over RT k-steps of 8 (one per n8 tile of P), B the tile's rows in set_operand's order:
  // b0 = B[2t][n], b1 = B[2t + 1][n] of the k-step's 8 rows; COLS columns from `tile` on, two column tiles a
  // time (add_kstep). (An odd last column tile, the fused backward's dQ slice at head dims 32 and 96, goes alone.)
  template <int HEAD_DIM, int RT, int COLS = HEAD_DIM, bool FAST = false>
  static __device__ __forceinline__ void product_pb(float (&acc)[COLS / 8][4], const PFrag<RT>& pf,
                                                    const float* tile, int lane) {
    constexpr int STRIDE = HEAD_DIM + VEC;
    static_assert(COLS % 8 == 0, "whole column tiles");
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int kk = 0; kk < RT; ++kk) {
      const Split as[4] = {split(pf.r[kk][0]), split(pf.r[kk][1]), split(pf.r[kk][2]), split(pf.r[kk][3])};
#pragma unroll
      for (int d0 = 0; d0 < COLS / 8; d0 += 2) {
        const int w = COLS / 8 - d0 < 2 ? 1 : 2;  // column tiles of this step (known once unrolled)
        Split b0[2], b1[2];
#pragma unroll
        for (int j = 0; j < w; ++j) {
          const float* b = tile + (kk * 8 + 2 * t) * STRIDE + (d0 + j) * 8 + g;
          b0[j] = split<false, FAST>(b[0]);
          b1[j] = split<false, FAST>(b[STRIDE]);
        }
        add_kstep<false>(acc, d0, w, as, b0, b1);
      }
    }
  }
};

// The module's family.
template <int KIND>
struct OpsOf {
  typedef HalfOps<KIND == ELEM_BF16> type;
};
template <>
struct OpsOf<ELEM_F32> {
  typedef Tf32Ops<3> type;
};
template <>
struct OpsOf<ELEM_TF32> {
  typedef Tf32Ops<1> type;
};
typedef OpsOf<EFF_ELEM>::type Ops;
typedef Ops::Elem Elem;

// Whether every value of this warp's held A fragments is finite, with EFF_FAST_SPLIT (else false): a product
// on them and a tile that landed finite takes Tf32Ops' 4-instruction split for both. Every lane calls it.
template <int HEAD_DIM>
__device__ __forceinline__ bool held_finite(const Ops::AFrag<HEAD_DIM>& f) {
#if EFF_FAST_SPLIT
  u32 widest = 0;  // of the magnitudes' bits: non-finite ones from 0x7f800000 on
#pragma unroll
  for (int ks = 0; ks < HEAD_DIM / 8; ++ks)
#pragma unroll
    for (int r = 0; r < 4; ++r) widest = max(widest, __float_as_uint(f.r[ks][r]) & 0x7fffffffu);
  return __all_sync(0xffffffffu, widest < 0x7f800000u);
#else
  return false;
#endif
}

}  // namespace efficient
