// What the FLASH kernels share beyond common.cuh: the element type, shared-memory tile loads and
// fragment products over them, and the prologue that maps a CTA to its (batch, head) slice.
//
// Compile-time configuration comes from -D options (one compiled module per configuration):
//   CUSDPA_BF16        1 for bfloat16 inputs, 0 for float16
//   HEAD_DIM, HEAD_DIM_V  E and Ev (multiples of 8, <= 256)
//   IS_DROPOUT         1 to apply the Philox keep-mask
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include "common.cuh"

constexpr float LN2 = 0.6931471805599453f;

constexpr bool IS_BF16 = CUSDPA_BF16 != 0;
#if CUSDPA_BF16
typedef __nv_bfloat16 elem_t;
#define CUSDPA_MMA_TYPE "bf16"
__device__ __forceinline__ float elem_to_float(elem_t x) { return __bfloat162float(x); }
#else
typedef __half elem_t;
#define CUSDPA_MMA_TYPE "f16"
__device__ __forceinline__ float elem_to_float(elem_t x) { return __half2float(x); }
#endif

// E and Ev rounded up to the mma k/n granularity of 16; the extra columns are zero-filled in shared memory.
constexpr int E_PAD = (HEAD_DIM + 15) / 16 * 16;
constexpr int EV_PAD = (HEAD_DIM_V + 15) / 16 * 16;
// Shared-memory rows are padded by 16 bytes: with a row pitch of an odd number of 16-byte chunks, the
// 8 row addresses of one ldmatrix 8x8 load fall in 8 different bank groups (no conflicts), for every E.
constexpr int Q_PITCH = E_PAD + 8;
constexpr int V_PITCH = EV_PAD + 8;

// The (batch, head) slice a CTA works on, from blockIdx.y: the prologue of every FLASH kernel. A dense
// tensor is [batch, head, row, col] with strides (sb, sh, sm); a packed varlen one is [token, head, col],
// where sequence b holds tokens [cu[b], cu[b + 1]) and the batch stride is unused.
struct Slice {
    int b, h, kvh;         // batch, query head, kv head (GQA: `group` query heads share one kv head)
    u32 bh;                // b * Hq + h, the dropout counter's (batch, head) word
    int start_q, start_k;  // the sequence's first query / key token in packed tensors, else 0
    int L, S;              // its query and key lengths
    bool packed;
    Visibility<int> vis;

    // The slice of (batch, query head) bh = b * Hq + h.
    static __device__ __forceinline__ Slice query_head(int bh, int Hq, int group, const int* cu_q, const int* cu_k,
                                                       int L, int S, int left, int right, int lower_right) {
        const int h = bh % Hq;
        return Slice(bh / Hq, h, h / group, bh, cu_q, cu_k, L, S, left, right, lower_right);
    }
    // The slice of query head h of batch b, kv head kvh, bh = b * Hq + h: query_head with the caller's divisions.
    static __device__ __forceinline__ Slice query_head_of(int b, int h, int kvh, int bh, const int* cu_q,
                                                          const int* cu_k, int L, int S, int left, int right,
                                                          int lower_right) {
        return Slice(b, h, kvh, bh, cu_q, cu_k, L, S, left, right, lower_right);
    }
    // Grid rows over (batch, query head): blockIdx.y = b * Hq + h.
    static __device__ __forceinline__ Slice per_query_head(int Hq, int group, const int* cu_q, const int* cu_k,
                                                           int L, int S, int left, int right, int lower_right) {
        return query_head(blockIdx.y, Hq, group, cu_q, cu_k, L, S, left, right, lower_right);
    }
    // Grid rows over (batch, kv head): blockIdx.y = b * (Hq / group) + kvh; h is the group's first query head.
    static __device__ __forceinline__ Slice per_kv_head(int Hq, int group, const int* cu_q, const int* cu_k, int L,
                                                        int S, int left, int right, int lower_right) {
        const int Hkv = Hq / group, b = blockIdx.y / Hkv, kvh = blockIdx.y % Hkv;
        return Slice(b, kvh * group, kvh, b * Hq + kvh * group, cu_q, cu_k, L, S, left, right, lower_right);
    }

    // Row 0 of query head `head` (default h) in a tensor over queries (Q, O, dO, dQ).
    template <class T>
    __device__ __forceinline__ T* query_rows(T* base, long long sb, long long sh, long long sm, int head) const {
        return rows(base, packed, b, head, start_q, sb, sh, sm);
    }
    template <class T>
    __device__ __forceinline__ T* query_rows(T* base, long long sb, long long sh, long long sm) const {
        return query_rows(base, sb, sh, sm, h);
    }
    // Row 0 of the kv head in a tensor over keys (K, V, dK, dV).
    template <class T>
    __device__ __forceinline__ T* key_rows(T* base, long long sb, long long sh, long long sm) const {
        return rows(base, packed, b, kvh, start_k, sb, sh, sm);
    }
    // Row 0 of query head `head` (default h) in the per-row statistics (lse, D): [batch, head, row] with
    // the rows of a packed batch at their token index.
    __device__ __forceinline__ long long stats_offset(long long sb, long long sh, int head) const {
        return b * sb + head * sh + start_q;
    }
    __device__ __forceinline__ long long stats_offset(long long sb, long long sh) const {
        return stats_offset(sb, sh, h);
    }

    // Block mb (of block_m query rows) of query head `head` in a blocked per-query-block workspace (the Hopper
    // backward's dQ accumulator and its semaphores), with sb, sh in blocks: a dense slice's blocks at
    // b * sb + head * sh, a packed sequence's at head * sh plus its first token's block, rounded up past
    // the previous sequence's last block (so no two sequences share one).
    __device__ __forceinline__ long long query_block(long long sb, long long sh, int head, int block_m, int mb) const {
        return (packed ? (start_q + b * block_m) / block_m : b * sb) + head * sh + mb;
    }

  private:
    // Takes the fields as arguments instead of reading them from *this: with member reads, NVVM folds the
    // select of load_tile's source address differently in the lambda-issued loads of flash_bwd_dkdv, which
    // then costs registers and spills (measured with ptxas -v against the pre-Slice kernels).
    template <class T>
    static __device__ __forceinline__ T* rows(T* base, bool packed, int b, int head, int start, long long sb,
                                              long long sh, long long sm) {
        return base + (packed ? 0 : b * sb) + head * sh + start * sm;
    }
    __device__ __forceinline__ Slice(int b_, int h_, int kvh_, int bh_, const int* cu_q, const int* cu_k, int L_,
                                     int S_, int left, int right, int lower_right)
        : b(b_), h(h_), kvh(kvh_), bh(u32(bh_)), packed(cu_q != nullptr) {
        if (packed) {
            start_q = cu_q[b];
            L = cu_q[b + 1] - start_q;
            start_k = cu_k[b];
            S = cu_k[b + 1] - start_k;
        } else {
            start_q = start_k = 0;
            L = L_;
            S = S_;
        }
        vis = Visibility<int>{L, S, lower_right ? S - L : 0, left, right};
    }
};

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
                mma_16816<IS_BF16>(c[mt][2 * nn], a[mt], b[0], b[1]);
                mma_16816<IS_BF16>(c[mt][2 * nn + 1], a[mt], b[2], b[3]);
            }
        }
    }
}

// c += f(P) B with P held in registers as fp32 m16n8 accumulator tiles p[mt][2 * K16] (two adjacent n-tiles
// are one m16k16 A fragment once rounded to elem) and B (K16*16 rows x N16*16 columns) row-major in shared
// memory, read transposed by ldmatrix: the O += P V shape (also dQ += dS K, dV += P^T dO, dK += dS^T Q).
// f(value, nt, c) transforms each element on the way (dropout, identity).
// (mma_pb_at: the same with B anywhere, `at(kk, nn)` the lane's ldmatrix .trans address of k block kk, n block nn.)
template <int MT, int N16, int K16, class F, class At>
__device__ __forceinline__ void mma_pb_at(float (&c)[MT][2 * N16][4], const float (&p)[MT][2 * K16][4], F f, At at) {
#pragma unroll
    for (int kk = 0; kk < K16; ++kk) {
        u32 a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            const float(&lo)[4] = p[mt][2 * kk];
            const float(&hi)[4] = p[mt][2 * kk + 1];
            a[mt][0] = pack2<IS_BF16>(f(lo[0], 2 * kk, 0), f(lo[1], 2 * kk, 1));
            a[mt][1] = pack2<IS_BF16>(f(lo[2], 2 * kk, 2), f(lo[3], 2 * kk, 3));
            a[mt][2] = pack2<IS_BF16>(f(hi[0], 2 * kk + 1, 0), f(hi[1], 2 * kk + 1, 1));
            a[mt][3] = pack2<IS_BF16>(f(hi[2], 2 * kk + 1, 2), f(hi[3], 2 * kk + 1, 3));
        }
#pragma unroll
        for (int nn = 0; nn < N16; ++nn) {
            u32 b[4];
            ldmatrix_x4_trans(b, at(kk, nn));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma_16816<IS_BF16>(c[mt][2 * nn], a[mt], b[0], b[1]);
                mma_16816<IS_BF16>(c[mt][2 * nn + 1], a[mt], b[2], b[3]);
            }
        }
    }
}
template <int MT, int N16, int K16, class F>
__device__ __forceinline__ void mma_pb(float (&c)[MT][2 * N16][4], const float (&p)[MT][2 * K16][4], F f,
                                       const elem_t* sB, int b_pitch, int lane) {
    mma_pb_at<MT, N16, K16>(c, p, f, [&](int kk, int nn) {
        return bt_frag_addr(sB + kk * 16 * b_pitch + nn * 16, b_pitch, lane);
    });
}

struct Identity {
    __device__ __forceinline__ float operator()(float x, int, int) const { return x; }
};
