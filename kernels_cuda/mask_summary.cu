// The attn_mask's summary for the Hopper kernels, made on the GPU in one pass over the mask (one CTA per
// tile of block_m query rows x block_n keys of each (batch, head) slice the mask holds; grid (query blocks x
// n_n key blocks, mask batch x mask heads), the key block innermost):
//
//   seen[bh][j] = 1 (rows seen_pitch bytes apart) where some query row of the slice attends key j: the mask attends (bool: nonzero; float:
//     not -inf, NaN included, as it propagates) and the visibility rule (causal, window) lets the row see it.
//     Kernels zero the K and V rows of unseen keys before their products, as cusdpa/reference.py does, so
//     NaN or inf stored at a padded key never meets a probability of 0. mask_seen_init zeroes `seen` first;
//     CTAs only store ones (two CTAs may store the same byte: the same value).
//   blocks[bh][m][n]: 0 when no pair of the tile is attended (the Hopper forward skips the key
//     block), 2 when the mask attends every pair of the tile that the visibility rule shows (a bool mask:
//     the forward reads none of it), else 1 (always 1 where `skip` is 0: every block visited and read); plus 4 where a key of the tile is attended by none of its rows
//     (the forward's producer then zeroes the V rows of the block's keys that `seen` marks unseen: a
//     superset of the blocks holding them, known within the tile's own pass); plus 8 where a float mask
//     holds -inf at a visible pair of the tile (the forward then selects those scores out, NaN or not).
//
// Where the mask's rows broadcast (rows = 1, key padding) one query block covers every row and the
// visibility rule is left to the kernels, which zero the rows outside the keys the slice sees themselves.
// ATTN_MASK as in flash_fwd_sm90.cu: 1 bool (a byte), 2 float16, 3 bfloat16, 4 float32. Keys contiguous.
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include "common.cuh"

#if ATTN_MASK == 1
typedef unsigned char mask_t;
__device__ __forceinline__ bool attends(mask_t x) { return x != 0; }
#elif ATTN_MASK == 2
typedef __half mask_t;
__device__ __forceinline__ bool attends(mask_t x) { return __half2float(x) != -CUSDPA_INF; }
#elif ATTN_MASK == 3
typedef __nv_bfloat16 mask_t;
__device__ __forceinline__ bool attends(mask_t x) { return __bfloat162float(x) != -CUSDPA_INF; }
#else
typedef float mask_t;
__device__ __forceinline__ bool attends(mask_t x) { return x != -CUSDPA_INF; }
#endif

constexpr int THREADS = 256;

extern "C" __global__ void __launch_bounds__(THREADS)
mask_summary(const mask_t* __restrict__ mask, long long m_sb, long long m_sh, long long m_sm, int Hm, int rows,
             int L, int S, int left, int right, int lower_right, int block_m, int block_n, int n_n,
             signed char* __restrict__ blocks, unsigned char* __restrict__ seen, long long seen_pitch, int skip) {
    __shared__ unsigned char col_seen[256];  // block_n <= 256
    const int bh = blockIdx.y, n0 = blockIdx.x % n_n * block_n, m0 = blockIdx.x / n_n * block_m;
    const mask_t* m = mask + (bh / Hm) * m_sb + (bh % Hm) * m_sh;
    const Visibility<int> vis{L, S, lower_right ? S - L : 0, left, right};
    // thread t: key n0 + t % block_n, rows m0 + t / block_n, then every `groups` rows on
    const int c = threadIdx.x % block_n, groups = THREADS / block_n, j = n0 + c;
    for (int x = threadIdx.x; x < block_n; x += THREADS) col_seen[x] = 0;
    __syncthreads();
    bool any = false, hidden = false;  // an attended visible pair; a visible pair the mask hides
    if (threadIdx.x < groups * block_n && j < S) {
        const int r_end = min(m0 + block_m, rows);
        // BATCH rows' loads in flight a thread (rows past the tile's end reload its last one, unused): one at a
        // time left the pass at a quarter of the memory's speed
        constexpr int BATCH = 8;
        for (int i0 = m0 + threadIdx.x / block_n; i0 < r_end; i0 += BATCH * groups) {
            mask_t x[BATCH];
#pragma unroll
            for (int u = 0; u < BATCH; ++u) x[u] = m[min(i0 + u * groups, r_end - 1) * m_sm + j];
#pragma unroll
            for (int u = 0; u < BATCH; ++u) {
                const int i = i0 + u * groups;
                const bool shown = i < r_end && (rows == 1 || vis.visible(i, j)), a = attends(x[u]);
                any |= shown && a;
                hidden |= shown && !a;
            }
        }
        if (any) col_seen[c] = 1;
    }
    const bool tile_any = __syncthreads_or(any), tile_hidden = __syncthreads_or(hidden);
    const bool mine = threadIdx.x < block_n && j < S, hole = __syncthreads_or(mine && !col_seen[threadIdx.x]);
    if (mine && col_seen[threadIdx.x]) seen[bh * seen_pitch + j] = 1;
    if (threadIdx.x == 0)
        blocks[static_cast<long long>(bh) * gridDim.x + blockIdx.x] =
            (!skip ? 1 : !tile_any ? 0 : (ATTN_MASK == 1 && !tile_hidden ? 2 : 1)) | (hole ? 4 : 0) |
            (ATTN_MASK >= 2 && tile_hidden ? 8 : 0);
}

// `seen` before mask_summary: 0 for keys [0, S) of each row of `pitch` bytes, 1 for the padding after them;
// and the Hopper forward's tile counter (two int32 at byte `taken_at` of `blocks`, flash_fwd_sm90.cu's
// TileQueue) zeroed.
extern "C" __global__ void __launch_bounds__(THREADS)
mask_seen_init(unsigned char* __restrict__ seen, long long bytes, long long pitch, int S, signed char* blocks,
               long long taken_at) {
    const long long x = static_cast<long long>(blockIdx.x) * THREADS + threadIdx.x;
    if (x < bytes) seen[x] = x % pitch < S ? 0 : 1;
    if (x < 2) reinterpret_cast<int*>(blocks + taken_at)[x] = 0;
}
