// Where a persistent kernel's warps spend their clocks, phase by phase (benchmarks/fwd90_phases.py reads
// them). Compiled in with -DCUSDPA_PHASES=1 only; otherwise every call below is empty and the kernel's
// machine code is what it was.
//
// A warp keeps one 32-bit timestamp (%clock, the SM's clock: differences within a warp are exact, and
// the wrap after 2^32 clocks, about 2.4 s, is harmless in an unsigned difference). `to(slot)` charges the
// clocks since the previous mark to `slot` and starts the next phase, so a kernel's marks partition each
// warp's time. Lane 0 adds the difference to the warp's cell with a fire-and-forget reduction (RED: no
// value returns, so nothing waits on it), one cell per (CTA modulo PHASE_CTAS, warp, slot): a run's
// sums per slot and warp role are exact; what the marks cost is a clock read and, on lane 0, one RED.
// The reads are `asm volatile`, as the mbarrier waits, wgmma and named barriers are, so the compiler keeps
// each mark between the instructions it separates in the source.
#pragma once

#ifndef CUSDPA_PHASES
#define CUSDPA_PHASES 0
#endif

constexpr int PHASE_SLOTS = 20;
constexpr int PHASE_WARPS = 16;
constexpr int PHASE_CTAS = 256;

// The slots. A consumer warp's: the tile's bookkeeping (taking the tile, its slice and key blocks), the
// waits for Q, K and V to arrive, for its ping-pong turn, issuing products, waiting for S and for P V,
// the softmax (score modifiers, softmax, P's rounding, the rescale), the epilogue (O and lse to memory).
// The producer's: the same bookkeeping, its waits for the Q, K and V buffers to be released (slots
// PH_WAIT_Q..PH_WAIT_V), issuing the copies, and zeroing a V block's unseen rows. PH_START: from the
// kernel's start to the first tile; PH_END: from the last tile to the exit. A consumer's waits for a tile's
// first K block and first turn are PH_WAIT_K0 and PH_TURN0 (what a tile's start costs, apart from the steady
// state's PH_WAIT_K and PH_TURN). PH_TILES and PH_BLOCKS count tiles and key blocks (not clocks).
enum Phase {
    PH_TILE = 0, PH_WAIT_Q, PH_WAIT_K, PH_WAIT_V, PH_TURN, PH_ISSUE, PH_WAIT_S, PH_SOFTMAX, PH_WAIT_PV,
    PH_EPILOGUE, PH_ZERO, PH_START, PH_END, PH_WAIT_K0, PH_TURN0, PH_TILES, PH_BLOCKS
};
static_assert(PH_BLOCKS < PHASE_SLOTS, "a cell per slot");

#if CUSDPA_PHASES
__device__ unsigned long long cusdpa_phases[PHASE_CTAS * PHASE_WARPS * PHASE_SLOTS];

__device__ __forceinline__ u32 phase_clock() {
    u32 t;
    asm volatile("mov.u32 %0, %%clock;\n" : "=r"(t)::"memory");
    return t;
}

struct PhaseClock {
    u32 t;
    __device__ __forceinline__ PhaseClock() : t(phase_clock()) {}
    __device__ __forceinline__ unsigned long long* cell(int slot) const {
        const int warp = static_cast<int>(threadIdx.x / 32) % PHASE_WARPS;
        return cusdpa_phases + (static_cast<int>(blockIdx.x % PHASE_CTAS) * PHASE_WARPS + warp) * PHASE_SLOTS + slot;
    }
    __device__ __forceinline__ void to(int slot) {
        const u32 now = phase_clock();
        if (threadIdx.x % 32 == 0) atomicAdd(cell(slot), static_cast<unsigned long long>(now - t));
        t = now;
    }
    __device__ __forceinline__ void count(int slot, int n = 1) const {
        if (threadIdx.x % 32 == 0) atomicAdd(cell(slot), static_cast<unsigned long long>(n));
    }
};
#else
struct PhaseClock {
    __device__ __forceinline__ void to(int) const {}
    __device__ __forceinline__ void count(int, int = 1) const {}
};
#endif
