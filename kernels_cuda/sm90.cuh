// Hopper (sm_90a) primitives the warp-specialised FLASH kernels share: TMA tensor maps and copies,
// mbarriers, register reallocation, named barriers, wgmma descriptors and ordering.
#pragma once
#include "flash_common.cuh"

// A CUtensorMap, opaque: 128 bytes encoded by the driver on the host, passed by value as a __grid_constant__.
struct __align__(64) TmaMap {
    unsigned long long bits[16];
};

// ---- mbarriers and TMA ---------------------------------------------------------------------------------

__device__ __forceinline__ void mbar_init(unsigned long long* bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
// Arrive and add `bytes` to the transaction count the phase waits for (the TMA copies complete them).
__device__ __forceinline__ void mbar_expect_tx(unsigned long long* bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}
// After the inits, before the CTA-wide barrier that publishes them: the inits made visible to the other
// threads' arrives and to the async proxy, whose TMA copies complete transactions on them.
__device__ __forceinline__ void mbar_init_fence() {
    asm volatile("fence.mbarrier_init.release.cluster;\nfence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned long long* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
// Wait until the phase of parity `phase` completed. A fresh barrier counts the phase before it (parity 1)
// as completed, which is how producers start on "empty" barriers.
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, u32 phase) {
    u32 done;
    do {
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(smem_u32(bar)), "r"(phase)
            : "memory");
    } while (!done);
}
// The same by every lane of a warp, which then runs on converged: the lanes may leave the spin loop at
// different polls, and the .aligned instructions that follow (bar.sync, wgmma) need the whole warp.
__device__ __forceinline__ void mbar_wait_warp(unsigned long long* bar, u32 phase) {
    mbar_wait(bar, phase);
    __syncwarp();
}
// Box (c0, c1, c2, c3) of a 4-D tensor map into shared memory; completes `bytes` on `bar`.
__device__ __forceinline__ void tma_load(void* dst, const TmaMap& map, unsigned long long* bar, int c0, int c1, int c2,
                                         int c3) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], [%2];\n"
        ::"r"(smem_u32(dst)), "l"(reinterpret_cast<unsigned long long>(&map)), "r"(smem_u32(bar)), "r"(c0), "r"(c1),
        "r"(c2), "r"(c3)
        : "memory");
}
// ---- clusters (FWD90_CLUSTER) -------------------------------------------------------------------------

// This CTA's rank in its cluster.
__device__ __forceinline__ u32 cluster_rank() {
    u32 r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
    return r;
}
// Every non-exited thread of the cluster meets here (all lanes of a warp together); the arrive releases this
// thread's earlier writes and mbarrier arrivals to the cluster, the wait acquires the others'.
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
// Arrive on the mbarrier at `bar`'s offset in the shared memory of cluster CTA `cta` (this CTA's own too). The
// consumers arrive so once their products have completed (wgmma_wait): their reads of the buffer are done, not
// merely ordered, so the default .cta-scoped release suffices, as CUTLASS's ClusterBarrier arrives; a
// .release.cluster arrive costs a MEMBAR.ALL.GPU before each arrival (nvcc 13.0 SASS).
__device__ __forceinline__ void mbar_arrive_cta(unsigned long long* bar, u32 cta) {
    asm volatile("{\n.reg .b32 remote;\nmapa.shared::cluster.u32 remote, %0, %1;\n"
                 "mbarrier.arrive.shared::cluster.b64 _, [remote];\n}\n"
                 ::"r"(smem_u32(bar)), "r"(cta) : "memory");
}
// tma_load's box written to `dst`'s offset in the shared memory of every CTA of `ctas` (a bit per rank), each
// completing its bytes on the mbarrier at `bar`'s offset there.
__device__ __forceinline__ void tma_load_multicast(void* dst, const TmaMap& map, unsigned long long* bar, int c0,
                                                   int c1, int c2, int c3, unsigned short ctas) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
        " [%0], [%1, {%3, %4, %5, %6}], [%2], %7;\n"
        ::"r"(smem_u32(dst)), "l"(reinterpret_cast<unsigned long long>(&map)), "r"(smem_u32(bar)), "r"(c0), "r"(c1),
        "r"(c2), "r"(c3), "h"(ctas)
        : "memory");
}
// A ROWS x D tile (its D / (SW / 2) swizzled column chunks) at row `row`, head and batch coordinates `head`,
// `batch`: the bytes announced on `bar`, then the copies that complete them. With CLUSTER > 1 the tile is shared
// by the CTAs of the cluster: this CTA (`rank`) loads its ROWS / CLUSTER rows into every CTA's buffer and the
// others the rest, so the whole tile's bytes arrive on each CTA's `bar` (the map's box is ROWS / CLUSTER rows;
// whole groups of 8 rows keep the swizzle).
template <int ROWS, int D, int SW, int CLUSTER = 1>
__device__ __forceinline__ void tma_load_tile(unsigned char* dst, const TmaMap& map, unsigned long long* bar, int row,
                                              int head, int batch, u32 rank = 0) {
    constexpr int PART = ROWS / CLUSTER;
    static_assert(CLUSTER == 1 || PART % 8 == 0, "a cluster's share of a tile: whole groups of 8 rows");
    mbar_expect_tx(bar, ROWS * D * 2);
#pragma unroll
    for (int c = 0; c < D / (SW / 2); ++c) {
        if (CLUSTER == 1)
            tma_load(dst + c * ROWS * SW, map, bar, SW / 2 * c, row, head, batch);
        else
            tma_load_multicast(dst + c * ROWS * SW + rank * PART * SW, map, bar, SW / 2 * c, row + rank * PART, head,
                               batch, static_cast<unsigned short>((1u << CLUSTER) - 1));
    }
}
// The other way: box (c0, c1, c2, c3) of a 4-D tensor map written from shared memory, in the issuing
// thread's bulk group. Elements of the box outside the tensor are not written (a tile's rows past L).
__device__ __forceinline__ void tma_store(const void* src, const TmaMap& map, int c0, int c1, int c2, int c3) {
    asm volatile("cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [%0, {%2, %3, %4, %5}], [%1];\n"
                 ::"l"(reinterpret_cast<unsigned long long>(&map)), "r"(smem_u32(src)), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
                 : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Wait until the calling thread's bulk async-groups have read their shared memory (READ: it may be written
// again) or completed altogether (their writes performed: before the CTA exits and its shared memory goes).
template <bool READ>
__device__ __forceinline__ void bulk_wait() {
    if (READ)
        asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
    else
        asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
}
// The byte offset of byte `off` of a tile whose rows of SW bytes (128 or 64) are in the swizzle that TMA
// and wgmma use: the 16-byte chunk index (bits 4..) XORed with the row's index within its 1024-byte
// group (bits 7..), as the tile loads above write them; the tile starts 1024-byte aligned.
template <int SW>
__device__ __forceinline__ u32 swizzled(u32 off) { return off ^ (((off >> 7) & (SW / 16 - 1)) << 4); }
__device__ __forceinline__ void tma_prefetch(const TmaMap& map) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<unsigned long long>(&map)) : "memory");
}

// The calling warp's index, as a value the compiler knows to be the same in every lane (a shuffle from lane
// 0): what derives from it (a warpgroup's tile addresses, its wgmma descriptors) stays in uniform registers.
__device__ __forceinline__ int warp_index() { return __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x / 32), 0); }

// ---- registers and named barriers ---------------------------------------------------------------------

template <int N>
__device__ __forceinline__ void setmaxnreg_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N)); }
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N)); }
// Named barriers (0 is __syncthreads): `threads` of the CTA meet at barrier `id`; arrive does not wait.
template <int THREADS>
__device__ __forceinline__ void named_sync(int id) { asm volatile("bar.sync %0, %1;\n" ::"r"(id), "n"(THREADS) : "memory"); }
template <int THREADS>
__device__ __forceinline__ void named_arrive(int id) { asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "n"(THREADS) : "memory"); }

// ---- wgmma ---------------------------------------------------------------------------------------------

// Shared-memory matrix descriptor of a tile in the SW-byte swizzle (128 or 64). K-major operands (Q, K)
// step through K within a swizzle row by moving the start address 32 bytes per k16; the leading offset
// is unused for them. For V (MN-major) the leading offset is the distance between column chunks. The
// stride offset is the distance between groups of 8 rows.
template <int SW>
__device__ __forceinline__ unsigned long long sw_desc(const void* p, unsigned lbo) {
    const unsigned long long addr = smem_u32(p);
    return ((addr & 0x3FFFF) >> 4) | (static_cast<unsigned long long>(lbo >> 4) << 16) |
           (static_cast<unsigned long long>(8 * SW >> 4) << 32) | ((SW == 128 ? 1ull : 2ull) << 62);
}

// The descriptor of the same tile's operand `bytes` further on (a compile-time step through it): the start
// address is the low 14 bits in 16-byte units, and shared memory below 256 KB never carries out of them,
// so one 32-bit add replaces encoding each address again (at E = 64 the encodings were a fifth of the
// backward's instructions).
__device__ __forceinline__ unsigned long long desc_plus(unsigned long long d, u32 bytes) {
    return (d & 0xFFFFFFFF00000000ull) | (static_cast<u32>(d) + (bytes >> 4));
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// After the wait: tell the compiler the accumulators change here, so no read of them moves above it.
// Four 8x8 matrices of 16-bit elements from the warp's registers into shared memory (stmatrix): register q of
// every thread holds its pair of matrix q -- row lane / 4, columns 2 (lane % 4) and the next, an mma
// accumulator fragment's layout -- and lane l gives the address of row l % 8 of matrix l / 8 (16 bytes, which
// a 16-byte swizzle keeps together). One instruction where the same stores take four 32-bit ones.
__device__ __forceinline__ void stmatrix_x4(u32 addr, u32 a, u32 b, u32 c, u32 d) {
    asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(a), "r"(b),
                 "r"(c), "r"(d)
                 : "memory");
}

// Before wgmma.fence, the same pins the last definition of a wgmma's input registers: a register move
// the compiler sinks between wgmma.fence and the wgmma makes ptxas serialise the wgmmas (C7513).
template <int N>
__device__ __forceinline__ void fence_regs(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
template <int N>
__device__ __forceinline__ void fence_regs(u32 (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+r"(d[i])::"memory");
}
// Generic-proxy writes (the producer's zeroed rows) must be ordered before the tensor cores' async-proxy reads.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Score modifiers of the Hopper kernels, chosen at compile time (-D): ATTN_MASK (0 none, 1 bool (a byte,
// nonzero = attend), 2 float16, 3 bfloat16, 4 float32, added to the scaled scores), ALIBI (FlashAttention's
// bias from per-head slopes), SOFTCAP (softcap * tanh(x / softcap) of the scaled score x). A float mask, ALiBi
// and soft-capping put the scores in natural units (NATURAL): each kernel says why.
#ifndef ATTN_MASK
#define ATTN_MASK 0
#endif
#ifndef ALIBI
#define ALIBI 0
#endif
#ifndef SOFTCAP
#define SOFTCAP 0
#endif
static_assert(ATTN_MASK >= 0 && ATTN_MASK <= 4, "ATTN_MASK: 0 none, 1 bool, 2 float16, 3 bfloat16, 4 float32");
constexpr bool FLOAT_MASK = ATTN_MASK >= 2;
constexpr bool NATURAL = FLOAT_MASK || ALIBI || SOFTCAP;
#if ATTN_MASK == 2
typedef __half mask_t;
#elif ATTN_MASK == 3
typedef __nv_bfloat16 mask_t;
#elif ATTN_MASK == 4
typedef float mask_t;
#else
typedef unsigned char mask_t;
#endif

// A warp's walk over the indices that a predicate holds for, 32 at a time: each lane evaluates one index of
// a chunk and a ballot keeps the chunk as bits, so skipping indices is bit arithmetic rather than a load
// per index (the attn_mask's block summary: the Hopper forward's key blocks, the backward's query steps).
// Every lane calls `from`, with the same arguments.
struct BallotWalk {
    int chunk = -32;  // the first index of the bits held (-32: none yet)
    u32 bits = 0u;    // bit l: the predicate holds for index chunk + l
    // The first index in [i, end) the predicate holds for (end: none); `lane_holds(m)`: whether it holds for
    // index m, evaluated by the lane that holds m.
    template <class Pred>
    __device__ __forceinline__ int from(int i, int end, Pred&& lane_holds) {
        while (i < end) {
            const int c = i & ~31;
            if (c != chunk) {
                chunk = c;
                bits = __ballot_sync(0xffffffffu, lane_holds(c + static_cast<int>(threadIdx.x % 32)));
            }
            const u32 ahead = bits >> (i & 31);
            if (ahead) return i + __ffs(ahead) - 1;
            i = chunk + 32;
        }
        return end;
    }
};

// Keys that the attn_mask lets no query row see, for a producer warp that zeroes their K or V rows before the
// products (NaN or inf stored at a padded key must not meet a probability of 0). `seen`: a byte per key of
// the slice (kernels_cuda/mask_summary.cu), its row padded to 16 bytes with ones; nullptr: every key seen.
// A key is unseen when it is unseen in each of `heads` slices `head_stride` bytes apart (the query heads
// sharing a K tile in the backward).
struct UnseenKeys {
    const unsigned char* seen;
    long long head_stride;
    int heads, S;
    __device__ __forceinline__ bool at(int j) const {  // key j < S
        for (int h = 0; h < heads; ++h)
            if (seen[j + h * head_stride]) return false;
        return true;
    }
    // Whether keys [j0, j0 + n) hold one (a warp's vote; lane l reads 16-byte pieces l, l + 32, ...).
    __device__ __forceinline__ bool any(int j0, int n, int lane) const {
        if (seen == nullptr) return false;  // (a constant nullptr: the kernels without a mask keep none of this)
        bool mine = false;
        for (int x = 16 * lane; x < n && j0 + x < S; x += 16 * 32) mine |= piece_unseen(j0 + x);
        return __any_sync(0xffffffffu, mine);
    }
    // Whether every key of [j0, j0 + n) (< S) is unseen (a warp's vote).
    __device__ __forceinline__ bool all(int j0, int n, int lane) const {
        if (seen == nullptr) return false;
        bool mine = true;
        for (int j = j0 + lane; j < j0 + n && j < S; j += 32) mine &= at(j);
        return __all_sync(0xffffffffu, mine);
    }
    // A 16-byte piece of keys from j (a multiple of 16) holds an unseen key (bytes past S read the padding).
    __device__ __forceinline__ bool piece_unseen(int j) const {
        uint4 all = make_uint4(0, 0, 0, 0);
        for (int h = 0; h < heads; ++h) {
            const uint4 x = *reinterpret_cast<const uint4*>(seen + j + h * head_stride);
            all = make_uint4(all.x | x.x, all.y | x.y, all.z | x.z, all.w | x.w);
        }
        return (__vcmpeq4(all.x, 0) | __vcmpeq4(all.y, 0) | __vcmpeq4(all.z, 0) | __vcmpeq4(all.w, 0)) != 0;
    }
};
