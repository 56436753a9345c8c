// Shared pieces of the FLASH kernels: tensor-core fragments (mma.sync m16n8k16, ldmatrix), cp.async
// tile loads with zero fill, the Philox4x32-10 dropout keep test, and the visibility rule.
//
// Compile-time configuration comes from -D options (one compiled module per configuration):
//   CUSDPA_BF16        1 for bfloat16 inputs, 0 for float16
//   HEAD_DIM, HEAD_DIM_V  E and Ev (multiples of 8, <= 256)
//   IS_DROPOUT         1 to apply the Philox keep-mask
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>
// NVRTC has no <stdint.h>: 32-bit words are plain unsigned ints.
typedef unsigned int u32;

#if CUSDPA_BF16
typedef __nv_bfloat16 elem_t;
typedef __nv_bfloat162 elem2_t;
#define CUSDPA_MMA_TYPE "bf16"
__device__ __forceinline__ elem2_t float2_to_elem2(float lo, float hi) { return __floats2bfloat162_rn(lo, hi); }
__device__ __forceinline__ float elem_to_float(elem_t x) { return __bfloat162float(x); }
#else
typedef __half elem_t;
typedef __half2 elem2_t;
#define CUSDPA_MMA_TYPE "f16"
__device__ __forceinline__ elem2_t float2_to_elem2(float lo, float hi) { return __floats2half2_rn(lo, hi); }
__device__ __forceinline__ float elem_to_float(elem_t x) { return __half2float(x); }
#endif

// E and Ev rounded up to the mma k/n granularity of 16; the extra columns are zero-filled in shared memory.
constexpr int E_PAD = (HEAD_DIM + 15) / 16 * 16;
constexpr int EV_PAD = (HEAD_DIM_V + 15) / 16 * 16;
// Shared-memory rows are padded by 16 bytes: with a row pitch of an odd number of 16-byte chunks, the
// 8 row addresses of one ldmatrix 8x8 load fall in 8 different bank groups (no conflicts), for every E.
constexpr int Q_PITCH = E_PAD + 8;
constexpr int V_PITCH = EV_PAD + 8;

// NVRTC has no <math.h>: +inf by its bit pattern.
#define CUSDPA_INF __int_as_float(0x7f800000)

constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

__device__ __forceinline__ u32 pack_elem2(float lo, float hi) {
    elem2_t v = float2_to_elem2(lo, hi);
    return *reinterpret_cast<u32*>(&v);
}

// D += A * B for one 16x8x16 tile: A row-major 16x16 (4 regs), B column-major 16x8 (2 regs), fp32 accumulate.
__device__ __forceinline__ void mma_16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32." CUSDPA_MMA_TYPE "." CUSDPA_MMA_TYPE ".f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, register i receives it.
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], const elem_t* p) {
    u32 addr = static_cast<u32>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], const elem_t* p) {
    u32 addr = static_cast<u32>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// Lane address for an A operand (16 rows x 16 k) stored row-major at `base` with `pitch`:
// lanes 0-15 take rows 0-15 at k 0..7, lanes 16-31 rows 0-15 at k 8..15 -> registers a0..a3.
__device__ __forceinline__ const elem_t* a_frag_addr(const elem_t* base, int pitch, int lane) {
    return base + (lane % 16) * pitch + (lane / 16) * 8;
}

// Lane address for two B operands (n 16 x k 16) stored n-major ("K rows"): registers b0,b1 of n-tile 0
// then b0,b1 of n-tile 1 (the 8 n rows of lanes 0-15 are n 0..7, of lanes 16-31 n 8..15).
__device__ __forceinline__ const elem_t* b_frag_addr(const elem_t* base, int pitch, int lane) {
    return base + ((lane / 16) * 8 + (lane % 8)) * pitch + ((lane / 8) % 2) * 8;
}

// Lane address for two B operands (k 16 x n 16) stored k-major ("V rows"), loaded with .trans.
__device__ __forceinline__ const elem_t* bt_frag_addr(const elem_t* base, int pitch, int lane) {
    return base + (((lane / 8) % 2) * 8 + (lane % 8)) * pitch + (lane / 16) * 8;
}

// 16-byte asynchronous copy global -> shared; when `pred` is false nothing is read and zeros are written.
__device__ __forceinline__ void cp_async_16(elem_t* smem, const elem_t* gmem, bool pred) {
    u32 s = static_cast<u32>(__cvta_generic_to_shared(smem));
    int src_bytes = pred ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Copy rows [row0, row0 + ROWS) x columns [0, COLS_PAD) of a row-major global matrix into shared memory.
// Rows outside [row_lo, row_hi) and columns >= COLS are zero-filled: padding and rows nobody may see
// never carry NaN/inf into the products.
template <int ROWS, int COLS, int COLS_PAD, int PITCH, int NTHREADS>
__device__ __forceinline__ void load_tile(elem_t* s, const elem_t* g, long long g_pitch, int row0, int row_lo,
                                          int row_hi) {
    constexpr int CHUNKS = COLS_PAD / 8;
#pragma unroll
    for (int c = threadIdx.x; c < ROWS * CHUNKS; c += NTHREADS) {
        int r = c / CHUNKS, ch = c % CHUNKS, row = row0 + r;
        bool pred = row >= row_lo && row < row_hi && ch * 8 < COLS;
        cp_async_16(s + r * PITCH + ch * 8, pred ? g + row * g_pitch + ch * 8 : g, pred);
    }
}

// Philox4x32-10 (Random123), as cusdpa/philox.py.
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

struct Dropout {
    u32 key0, key1, offset, threshold;
    // Keep bits of the two adjacent columns (j, j+1), j even, of row i: one Philox call covers both
    // since they share the counter (j / 4, i, bh, offset).
    __device__ __forceinline__ void keep_pair(u32 bh, int i, int j, bool& keep0, bool& keep1) const {
        uint4 w = philox4x32_10(make_uint4(u32(j) >> 2, u32(i), bh, offset), key0, key1);
        bool hi = (j & 2) != 0;
        keep0 = (hi ? w.z : w.x) < threshold;
        keep1 = (hi ? w.w : w.y) < threshold;
    }
    __device__ __forceinline__ bool keep(u32 bh, int i, int j) const {
        uint4 w = philox4x32_10(make_uint4(u32(j) >> 2, u32(i), bh, offset), key0, key1);
        // selects, not an indexed array: a run-time index would put the words in local memory
        const u32 word = (j & 2) ? ((j & 1) ? w.w : w.z) : ((j & 1) ? w.y : w.x);
        return word < threshold;
    }
};

// Visibility of key j to query i for one (batch, head) slice: j < S and, on the diagonal aligned by
// `shift` (0 upper-left, S - L lower-right), left >= 0 => j >= i + shift - left and right >= 0 =>
// j <= i + shift + right. Causal is right = 0 (intersected with any window), set by the host.
struct Visibility {
    int L, S, shift, left, right;
    __device__ __forceinline__ bool visible(int i, int j) const {
        int d = j - i - shift;
        return j < S && i < L && (left < 0 || d >= -left) && (right < 0 || d <= right);
    }
    // Keys [lo, hi) seen by some query row in [i0, i1).
    __device__ __forceinline__ void key_range(int i0, int i1, int& lo, int& hi) const {
        lo = left >= 0 ? max(0, i0 + shift - left) : 0;
        hi = right >= 0 ? min(S, i1 - 1 + shift + right + 1) : S;
    }
    // Query rows [lo, hi) that see some key in [j0, j1).
    __device__ __forceinline__ void query_range(int j0, int j1, int& lo, int& hi) const {
        lo = right >= 0 ? max(0, j0 - shift - right) : 0;
        hi = left >= 0 ? min(L, j1 - 1 - shift + left + 1) : L;
    }
    // Every (i, j) of the tile [i0, i0 + BM) x [j0, j0 + BN) is visible: no per-element mask needed.
    __device__ __forceinline__ bool tile_full(int i0, int bm, int j0, int bn) const {
        return i0 + bm <= L && j0 + bn <= S && (left < 0 || j0 >= i0 + bm - 1 + shift - left) &&
               (right < 0 || j0 + bn - 1 <= i0 + shift + right);
    }
};

// Where one (batch, head) slice of a tensor starts: dense tensors by batch stride, packed varlen tensors
// by the sequence's first token (cu_seqlens).
struct SeqInfo {
    int b, start_q, start_k, L, S;
    __device__ __forceinline__ SeqInfo(int b_, const int* cu_q, const int* cu_k, int L_, int S_) : b(b_) {
        if (cu_q != nullptr) {
            start_q = cu_q[b];
            L = cu_q[b + 1] - start_q;
            start_k = cu_k[b];
            S = cu_k[b + 1] - start_k;
        } else {
            start_q = start_k = 0;
            L = L_;
            S = S_;
        }
    }
};

// Start of one (batch, head) slice: dense tensors by batch stride, packed varlen ones by first token.
template <class T>
__device__ __forceinline__ T* slice_ptr(T* base, bool packed, int b, int h, int start, long long sb, long long sh,
                                        long long sm) {
    return base + (packed ? 0 : b * sb) + h * sh + start * sm;
}

// c += A B^T with A (MT*16 rows) and B (N16*16 rows) both row-major over the K16*16 reduction dim in shared
// memory: the S = Q K^T shape (also dP = dO V^T, S^T = K Q^T, dP^T = V dO^T). c[mt][nt] is an m16n8 tile.
template <int MT, int N16, int K16>
__device__ __forceinline__ void mma_abt(float (&c)[MT][2 * N16][4], const elem_t* sA, int a_pitch, const elem_t* sB,
                                        int b_pitch, int lane) {
#pragma unroll
    for (int kk = 0; kk < K16; ++kk) {
        u32 a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) ldmatrix_x4(a[mt], a_frag_addr(sA + mt * 16 * a_pitch + kk * 16, a_pitch, lane));
#pragma unroll
        for (int nn = 0; nn < N16; ++nn) {
            u32 b[4];
            ldmatrix_x4(b, b_frag_addr(sB + nn * 16 * b_pitch + kk * 16, b_pitch, lane));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma_16816(c[mt][2 * nn], a[mt], b[0], b[1]);
                mma_16816(c[mt][2 * nn + 1], a[mt], b[2], b[3]);
            }
        }
    }
}

// c += f(P) B with P held in registers as fp32 m16n8 accumulator tiles p[mt][2 * K16] (two adjacent n-tiles
// are one m16k16 A fragment once rounded to elem) and B (K16*16 rows x N16*16 columns) row-major in shared
// memory, read transposed by ldmatrix: the O += P V shape (also dQ += dS K, dV += P^T dO, dK += dS^T Q).
// f(value, nt, c) transforms each element on the way (dropout, identity).
template <int MT, int N16, int K16, class F>
__device__ __forceinline__ void mma_pb(float (&c)[MT][2 * N16][4], const float (&p)[MT][2 * K16][4], F f,
                                       const elem_t* sB, int b_pitch, int lane) {
#pragma unroll
    for (int kk = 0; kk < K16; ++kk) {
        u32 a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            const float(&lo)[4] = p[mt][2 * kk];
            const float(&hi)[4] = p[mt][2 * kk + 1];
            a[mt][0] = pack_elem2(f(lo[0], 2 * kk, 0), f(lo[1], 2 * kk, 1));
            a[mt][1] = pack_elem2(f(lo[2], 2 * kk, 2), f(lo[3], 2 * kk, 3));
            a[mt][2] = pack_elem2(f(hi[0], 2 * kk + 1, 0), f(hi[1], 2 * kk + 1, 1));
            a[mt][3] = pack_elem2(f(hi[2], 2 * kk + 1, 2), f(hi[3], 2 * kk + 1, 3));
        }
#pragma unroll
        for (int nn = 0; nn < N16; ++nn) {
            u32 b[4];
            ldmatrix_x4_trans(b, bt_frag_addr(sB + kk * 16 * b_pitch + nn * 16, b_pitch, lane));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma_16816(c[mt][2 * nn], a[mt], b[0], b[1]);
                mma_16816(c[mt][2 * nn + 1], a[mt], b[2], b[3]);
            }
        }
    }
}

struct Identity {
    __device__ __forceinline__ float operator()(float x, int, int) const { return x; }
};
