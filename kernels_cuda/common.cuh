// Pieces shared by the FLASH kernels (through flash_common.cuh) and the EFFICIENT tile loops (through
// efficient_common.cuh): tensor-core fragments (mma.sync m16n8k16, ldmatrix), cp.async copies with zero
// fill, the fp32 -> f16x2/bf16x2 packing, the Philox4x32-10 dropout keep test, and the visibility rule.
//
// Only NVRTC built-ins and inline PTX, no headers: the EFFICIENT source must compile wherever Numba finds
// NVRTC, CUDA headers or not. So the element type is a template flag (BF16: bfloat16, else float16) and
// elements travel as raw 16-bit halves of 32-bit registers.
#pragma once
// NVRTC has no <stdint.h>: 32-bit words are plain unsigned ints.
typedef unsigned int u32;

// NVRTC has no <math.h>: +inf by its bit pattern.
#define CUSDPA_INF __int_as_float(0x7f800000)

constexpr float LOG2E = 1.4426950408889634f;

// Two fp32 values rounded to one register of two 16-bit elements, lo in the lower half (the layout of
// mma fragments and of memory). cvt.rn.*x2.f32 d, a, b puts a in the upper half and b in the lower half.
template <bool BF16>
__device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 d;
    if (BF16)
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(d) : "f"(hi), "f"(lo));
    else
        asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}

// D += A * B for one 16x8x16 tile: A row-major 16x16 (4 regs), B column-major 16x8 (2 regs), fp32 accumulate.
template <bool BF16>
__device__ __forceinline__ void mma_16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    if (BF16)
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// A shared-memory pointer's byte address in the shared window.
__device__ __forceinline__ u32 smem_u32(const void* p) { return static_cast<u32>(__cvta_generic_to_shared(p)); }

// Four 8x8 b16 matrices from shared memory; lanes 8i..8i+7 give the row addresses of matrix i, register i
// receives it. (By shared-window byte address too: arithmetic on it stays 32-bit and folds into the instruction's
// immediate offset.)
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], const void* smem) {
    ldmatrix_x4(r, smem_u32(smem));
}

// The same, each matrix transposed: B fragments of a k-major (row-major V) tile.
__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], const void* smem) {
    ldmatrix_x4_trans(r, smem_u32(smem));
}

// 16-byte asynchronous copy global -> shared; when `pred` is false nothing is read and zeros are written
// (src-size 0), so rows past a sequence read as zeros without a branch.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool pred) {
    const u32 s = smem_u32(smem);
    int src_bytes = pred ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Philox4x32-10 (Random123); the same function as cusdpa/philox.py, compared bit for bit in tests.
__device__ __forceinline__ uint4 philox4x32_10(uint4 c, u32 k0, u32 k1) {
#pragma unroll
    for (int r = 0; r < 10; ++r) {
        u32 hi0 = __umulhi(0xD2511F53u, c.x), lo0 = 0xD2511F53u * c.x;
        u32 hi1 = __umulhi(0xCD9E8D57u, c.z), lo1 = 0xCD9E8D57u * c.z;
        c = make_uint4(hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0);
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    return c;
}

// The dropout keep test: element (i, j) of slice bh is kept iff word j % 4 of
// Philox(counter (j / 4, i, bh, offset), key (seed_lo, seed_hi)) is below `threshold`.
struct Dropout {
    u32 key0, key1, offset, threshold;
    // Keep bits of the two adjacent columns (j, j+1), j even, of row i: one Philox call covers both
    // since they share the counter.
    __device__ __forceinline__ void keep_pair(u32 bh, u32 i, u32 j, bool& keep0, bool& keep1) const {
        uint4 w = philox4x32_10(make_uint4(j >> 2, i, bh, offset), key0, key1);
        bool hi = (j & 2) != 0;
        keep0 = (hi ? w.z : w.x) < threshold;
        keep1 = (hi ? w.w : w.y) < threshold;
    }
    __device__ __forceinline__ bool keep(u32 bh, u32 i, u32 j) const {
        uint4 w = philox4x32_10(make_uint4(j >> 2, i, bh, offset), key0, key1);
        // selects, not an indexed array: a run-time index would put the words in local memory
        const u32 word = (j & 2) ? ((j & 1) ? w.w : w.z) : ((j & 1) ? w.y : w.x);
        return word < threshold;
    }
};

// Visibility of key j to query i for one (batch, head) slice: j < S and, on the diagonal aligned by
// `shift` (0 upper-left, S - L lower-right), left >= 0 => j >= i + shift - left and right >= 0 =>
// j <= i + shift + right. Causal is right = 0 (intersected with any window), folded in by the host
// (Problem.window_bounds), so this one rule serves every kernel. Index is the kernel's row/key type: int
// in FLASH, long long in the EFFICIENT tile loop (its Numba caller hands over 64-bit indices).
template <class Index>
struct Visibility {
    Index L, S, shift, left, right;
    __device__ __forceinline__ bool visible(Index i, Index j) const {
        Index d = j - i - shift;
        return j < S && i < L && (left < 0 || d >= -left) && (right < 0 || d <= right);
    }
    // Keys [lo, hi) that row i sees (empty past the last row): the per-element rule as two limits.
    __device__ __forceinline__ void row_keys(Index i, Index& lo, Index& hi) const {
        lo = left >= 0 ? max(Index(0), i + shift - left) : 0;
        hi = i >= L ? 0 : (right >= 0 ? min(S, i + shift + right + 1) : S);
    }
    // Keys [lo, hi) seen by some query row in [i0, i1).
    __device__ __forceinline__ void key_range(Index i0, Index i1, Index& lo, Index& hi) const {
        lo = left >= 0 ? max(Index(0), i0 + shift - left) : 0;
        hi = right >= 0 ? min(S, i1 - 1 + shift + right + 1) : S;
    }
    // Query rows [lo, hi) that see some key in [j0, j1).
    __device__ __forceinline__ void query_range(Index j0, Index j1, Index& lo, Index& hi) const {
        lo = right >= 0 ? max(Index(0), j0 - shift - right) : 0;
        hi = left >= 0 ? min(L, j1 - 1 - shift + left + 1) : L;
    }
    // Every (i, j) of the tile [i0, i0 + bm) x [j0, j0 + bn) is visible: no per-element mask needed.
    __device__ __forceinline__ bool tile_full(Index i0, Index bm, Index j0, Index bn) const {
        return i0 + bm <= L && j0 + bn <= S && (left < 0 || j0 >= i0 + bm - 1 + shift - left) &&
               (right < 0 || j0 + bn - 1 <= i0 + shift + right);
    }
};
