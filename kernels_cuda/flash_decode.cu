// Split-KV attention over a KV cache (flash-decoding) on mma.sync tensor cores: few query rows against
// long cached keys, read once, at the speed of memory.
//
// Layouts (cusdpa.kv_cache_attention's): query (B, Lq, Hq, E) with strides (q_sb, q_sl, q_sh); the caches
// (rows, slots, Hkv, E / Ev), sequence b's position p at row rows_of[b] (or b), slot p, or, PAGED, at row
// table[b, p / block_size], slot p % block_size. Sequence b holds n_keys = seqlens[b] + n_new keys
// (seqlens == nullptr: fixed_len), clamped to the capacity.
//
// flash_decode_split: grid (splits, B * Hkv). A CTA takes the query rows of one kv head's group, R = group
// * Lq <= 16 rows (row r: query head kvh * group + r / Lq, query r % Lq), as the 16 rows of one m16 tile
// (padding rows zero and unseen), and the keys of one split: [split * chunk, +chunk) with chunk = the
// sequence's keys / splits rounded up to whole tiles, so every split of a sequence gets its share of the
// keys it actually holds, whatever the grid was sized for (the host sizes it from the capacity, so a call
// never waits for the lengths on the device). Each warp streams its own tiles of DEC_TILE keys (tiles w,
// w + DEC_WARPS, ...) through a private DEC_STAGES-deep cp.async pipeline (no CTA barrier in the loop; DEC_TMA,
// the default on sm_90: a producer warp's TMA ring shared by the CTA, below), keeps its own online softmax (m, l)
// and O; the warps merge through shared memory at the end. One
// split: out and lse are written normalised; several: the split's O (relative to its max) and (m, l) go
// to the partial buffers, and the split CTA of each (b, kvh) that finishes last merges them (merge_splits:
// `arrivals`, one int32 per (b, kvh), zero at the launch, counts the finished splits; the merging CTA sets it
// back to zero, so a buffer kept from call to call on one stream needs no memset), so no combine kernel
// follows (on the H200 B = 1 S = 32768 took 54.5 us against 56.6 with one). Scores live in the log2 domain (m
// in log2 units).
//
// kv_cache_append (launched first when a call brings new tokens) writes them at each sequence's length.
//
// Visibility, per query l at position n_keys - Lq + l (bottom-right): keys j < n_keys, the window (left,
// right) with causal folded into right = 0 by the host. Keys no row of the CTA sees are never loaded
// (zero-filled: stale cache cells may hold anything, and 0 * NaN would reach O); a row that sees nothing
// gets 0 and lse -inf. softcap (SOFTCAP) and ALiBi (ALIBI: -slope * |pos - j|) in natural units, then
// the scores go to log2 units.
//
// With -DCUSDPA_PHASES=1 each warp's clocks go to phases.cuh's slots (benchmarks/decode.py --phases reads them):
// PH_START to Q's fragments, then per tile PH_ISSUE (the refill's copies and the next offsets; DEC_TMA: the
// producer's whole loop), PH_WAIT_K (the tile's landing), PH_WAIT_S (S's loads and products issued), PH_SOFTMAX
// (with the wait for S), PH_WAIT_PV (P V issued), and PH_EPILOGUE (the warps' merge, the split's writes), PH_END
// (the arrival and the splits' merge); PH_BLOCKS counts tiles.
//
// -D options beyond flash_common.cuh's: DEC_WARPS, DEC_TILE (keys per warp tile, a multiple of 16),
// DEC_STAGES, PAGED, SOFTCAP, ALIBI, DEC_MAX_SPLITS (bounds the splits), DEC_MERGE_UNROLL (the splits' partial
// outputs a merging thread loads at once), DEC_TMA (below).
//
// DEC_TMA (sm_90; head dims multiples of 64, a block of keys within one cache row: contiguous caches, pages of
// whole blocks): the CTA's keys come in blocks of DEC_WARPS x DEC_TILE keys, a stage of a ring shared by the
// CTA, loaded by a producer warp with TMA (boxes of 64 columns by the block's keys, swizzled 128 bytes as swz
// places them) and handed over by mbarriers, as FlashAttention-3's producer does; warp w takes the block's
// keys [w TILE, +TILE). No attending warp issues a copy (the cp.async ring's lanes spend a third of their clocks
// stalled issuing theirs); measured on the H100, that alone changed nothing at four warps, and at eight in two
// stages it kept B = 64 S = 2048 1.3% faster than the ring (BENCHMARKS.md). The split's chunks are whole
// blocks. Rows of a block outside the keys some row sees are loaded as they are (zeros past the capacity):
// their scores are selected out, and the reading warp zeroes their V rows (0 * a stale NaN would reach O).
#ifndef DEC_TMA
#define DEC_TMA 0
#endif
#include "flash_common.cuh"
#include "phases.cuh"
#if DEC_TMA
#include "sm90.cuh"
#endif

#ifndef SOFTCAP
#define SOFTCAP 0
#endif
#ifndef ALIBI
#define ALIBI 0
#endif
#ifndef DEC_MERGE_UNROLL
#define DEC_MERGE_UNROLL 8
#endif

constexpr int NW = DEC_WARPS;           // warps that attend
constexpr int NTHREADS = (NW + DEC_TMA) * 32;  // and DEC_TMA's producer warp
constexpr int TILE = DEC_TILE;
constexpr int STAGES = DEC_STAGES;
constexpr int NT = TILE / 8;      // n8 tiles of a score row block
constexpr int VT = EV_PAD / 8;    // n8 tiles of an output row block
constexpr int KK = E_PAD / 16;    // k16 steps of Q K^T
constexpr int ROWS = 16;          // query rows of a CTA: one m16 tile
// A key's row of K and of V in a stage: whole 128-byte lines, unpadded, its 16-byte chunks swizzled (swz).
constexpr int K_ROW = (E_PAD + 63) / 64 * 64;
constexpr int V_ROW = (EV_PAD + 63) / 64 * 64;
constexpr int STAGE_ELEMS = TILE * (K_ROW + V_ROW);  // a warp's tile (DEC_TMA: a stage holds NW of them)
// Element distances in a stage's K and V: from a key's row to the next (K_ROW_STEP, V_ROW_STEP) and from a row's
// 64-column line to its next (K_LINE, V_LINE). A warp's ring keeps a key's lines together; DEC_TMA's blocks
// keep each 64-column box whole, as TMA writes it ([line][key][64]).
#if DEC_TMA
constexpr int BLOCK = NW * TILE;  // keys of a block
constexpr int K_ROW_STEP = 64, V_ROW_STEP = 64, K_LINE = BLOCK * 64, V_LINE = BLOCK * 64;
static_assert(E_PAD % 64 == 0 && EV_PAD % 64 == 0, "DEC_TMA: head dims of whole 64-column boxes");
#else
constexpr int K_ROW_STEP = K_ROW, V_ROW_STEP = V_ROW, K_LINE = 64, V_LINE = 64;
#endif
constexpr int MERGE_UNROLL = DEC_MERGE_UNROLL;
static_assert(TILE % 16 == 0, "DEC_TILE must be a multiple of 16");

// Shared memory: sQ [ROWS][Q_PITCH], then per warp STAGES x (K tile [TILE][K_ROW], V tile [TILE][V_ROW]);
// DEC_TMA: the ring first, from a 1024-byte boundary (TMA's 128-byte swizzle repeats every 8 rows of 128 bytes),
// STAGES x (K block [K_ROW / 64][BLOCK][64], V block [V_ROW / 64][BLOCK][64]), then sQ. The stages are reused by
// the warps' merge ([NW][ROWS][EV_PAD] floats of O, [NW][ROWS] of m and l).
constexpr int SQ_ELEMS = ROWS * Q_PITCH;
constexpr int PIPE_BYTES = NW * STAGES * STAGE_ELEMS * 2;
constexpr int MERGE_BYTES = NW * ROWS * (EV_PAD + 2) * 4;
static_assert(MERGE_BYTES <= PIPE_BYTES, "the merge reuses the pipeline's shared memory");

// Where chunk c (16 bytes) of row r of a stage's tile lies in its row: the chunk's place within its 128-byte line
// XORed with the row, so that each 128-byte piece of a key's row in memory fills one aligned line of shared
// memory, and ldmatrix's 8 rows at one chunk fall in 8 different bank groups. Rows padded by 16 bytes instead
// (ldmatrix's usual remedy) put most 128-byte pieces across two lines, and the L1 split each copy instruction's
// requests there, the sector at the seam requested twice (ncu, H100, B = 1 S = 32768: 6.3 M sectors read from
// L2 in 2.8 M requests for 4.2 M sectors of keys, 34% of them hits; swizzled, 4.2 M in 1.06 M, as cuDNN's).
__host__ __device__ constexpr int swz(int r, int c) { return (c & ~7) | ((c ^ r) & 7); }

// What the layout relies on, checked as it compiles: each chunk of a row of C stays in its 128-byte line and
// within the row's lines, no two chunks of a row share a place, and ldmatrix's 8 rows (8 aligned rows at one
// chunk) take 8 places; stages, tiles and rows start on lines.
__host__ __device__ constexpr bool swizzle_holds(int C) {
    for (int r = 0; r < 8; ++r)
        for (int c = 0; c < C; ++c) {
            if (swz(r, c) / 8 != c / 8 || swz(r, c) >= (C + 7) / 8 * 8) return false;
            for (int k = 0; k < 8; ++k) {
                const int mate = (c & ~7) + k;  // a chunk of the same line
                if (k != r && swz(k, c) == swz(r, c)) return false;
                if (mate != c && mate < C && swz(r, mate) == swz(r, c)) return false;
            }
        }
    return true;
}
static_assert(swizzle_holds(E_PAD / 8) && swizzle_holds(EV_PAD / 8), "swz: a permutation within each line");
static_assert((SQ_ELEMS * 2) % 128 == 0 && (K_ROW * 2) % 128 == 0 && (V_ROW * 2) % 128 == 0,
              "Q's rows end, and so every stage, tile and row starts, on a 128-byte line");

// A compile-time flag as a value, to instantiate a generic lambda per case.
template <bool B>
struct Flag {
    static constexpr bool value = B;
};

// Merging partial results: a sequence's splits (add_part), and the rows' results of a CTA's warps or splits
// (merged_pair, merged_lse). A part weighing nothing adds nothing, by a select:
// one that saw nothing of the row may hold 0 * NaN in its O, and its load is issued whatever its weight.
__device__ __forceinline__ void add_part(float& o0, float& o1, float2 p, float w) {
    o0 += w == 0.f ? 0.f : p.x * w;
    o1 += w == 0.f ? 0.f : p.y * w;
}
// A merged row's output pair O / total, 0 where the row saw nothing (total 0), and its lse from its max m (log2).
__device__ __forceinline__ u32 merged_pair(float o0, float o1, float total) {
    const bool empty = total == 0.f;
    const float inv = 1.f / total;
    return pack2<IS_BF16>(empty ? 0.f : o0 * inv, empty ? 0.f : o1 * inv);
}
__device__ __forceinline__ float merged_lse(float m, float total) {
    return total == 0.f ? -CUSDPA_INF : (m + log2f(total)) * LN2;
}

// Where key j of sequence b sits: the element offset of its (row, slot) for kv head 0 of the K cache (`k`)
// and of the V cache (`v`).
struct Cache {
    const int* table;  // PAGED: (B, blocks) with row stride table_sb; else rows_of (B,) or nullptr
    long long table_sb, k_sr, k_ss, v_sr, v_ss;
    int block_size;
    __device__ __forceinline__ void at(int b, int j, long long& k, long long& v) const {
#if PAGED
        const long long row = table[b * table_sb + j / block_size], slot = j % block_size;
#else
        const long long row = table ? table[b] : b, slot = j;
#endif
        k = row * k_sr + slot * k_ss;
        v = row * v_sr + slot * v_ss;
    }
};

// Where a warp finds the keys of a tile: AFFINE (a contiguous cache, or blocks of whole tiles), key r of the
// tile at the offsets (ko, vo) of its first key plus r rows, the same in every lane; otherwise each lane
// holds the offsets of key lane % TILE and the copy gathers them by shuffles. Found a tile ahead of the copy,
// so that a block table's latency hides behind a tile's products. Keys outside [lo, hi) are never read.
template <bool AFFINE>
__device__ __forceinline__ void key_offsets(const Cache& cache, int b, int j0, int lo, int hi, int lane, long long& k,
                                            long long& v) {
    const int j = AFFINE ? max(j0, lo) : j0 + lane % TILE;
    k = v = 0;
    if (j < hi && (AFFINE || j >= lo)) cache.at(b, j, k, v);
    if (AFFINE && j > j0) {  // the first key of a tile cut by lo: back to the tile's start (never dereferenced)
        k -= (j - j0) * cache.k_ss;
        v -= (j - j0) * cache.v_ss;
    }
}

// One warp's copy of the rows of keys [j0, j0 + TILE) of one cache (DIM columns, DIM_PAD in shared memory
// rows of ROW, swizzled by swz) into its stage, the offsets from key_offsets (`off`, `ss`: its slot stride);
// keys outside [lo, hi) zero-filled, without a per-chunk test when the whole tile lies inside. Lanes take
// consecutive 16-byte chunks of one key's row (coalesced).
template <bool AFFINE, int DIM, int DIM_PAD, int ROW>
__device__ __forceinline__ void load_rows(elem_t* s, const elem_t* g, long long off, long long ss, int j0, int lo,
                                          int hi, int lane) {
    constexpr int C = DIM_PAD / 8;  // 16-byte chunks of a key's row
    const bool inside = j0 >= lo && j0 + TILE <= hi;
    // Where a row's chunks divide a warp's 32 (E = 64, 128, 256), a lane copies the same chunk of every (32 / C)-th
    // row: one pointer stepped by that many rows, and no predicate where the tile lies inside (the general loop
    // below spends about 15 instructions on each 16-byte copy: a 64-bit row product, a reloaded stride, a test;
    // H100, bf16 Hq = 32 Hkv = 8 E = 128: B = 1 S = 32768 70.8 -> 70.0 us, B = 16 S = 8192 208.7 -> 206.3, B = 64
    // S = 2048 205.1 -> 202.5).
    if constexpr (AFFINE && 32 % C == 0 && 32 / C <= TILE) {
        constexpr int STEP = 32 / C;
        const int ch = lane % C, r0 = lane / C;
        const bool column = ch * 8 < DIM;
        const long long step = STEP * ss;
        const elem_t* src = g + off + r0 * ss + ch * 8;
        auto dst = [&](int i) { return s + (r0 + i * STEP) * ROW + swz(r0 + i * STEP, ch) * 8; };
        if (inside && column) {
#pragma unroll
            for (int i = 0; i < TILE / STEP; ++i, src += step) cp_async_16(dst(i), src, true);
        } else {
#pragma unroll
            for (int i = 0; i < TILE / STEP; ++i, src += step) {
                const int j = j0 + r0 + i * STEP;
                const bool pred = column && j >= lo && j < hi;
                cp_async_16(dst(i), pred ? src : g, pred);
            }
        }
        return;
    }
#pragma unroll
    for (int c = lane; c < TILE * C; c += 32) {
        const int r = c / C, ch = c % C, j = j0 + r;
        const long long row = AFFINE ? off + r * ss : __shfl_sync(0xffffffffu, off, r);
        const bool pred = (inside || (j >= lo && j < hi)) && ch * 8 < DIM;
        cp_async_16(s + r * ROW + swz(r, ch) * 8, pred ? g + row + ch * 8 : g, pred);
    }
}

template <bool AFFINE>
__device__ __forceinline__ void load_keys(elem_t* sK, elem_t* sV, const elem_t* kb, const elem_t* vb, const Cache& cache,
                                          long long ko, long long vo, int j0, int lo, int hi, int lane) {
    load_rows<AFFINE, HEAD_DIM, E_PAD, K_ROW>(sK, kb, ko, cache.k_ss, j0, lo, hi, lane);
    load_rows<AFFINE, HEAD_DIM_V, EV_PAD, V_ROW>(sV, vb, vo, cache.v_ss, j0, lo, hi, lane);
}

// The lane's ldmatrix offsets (elements) in a stage's swizzled tiles: b_frag_addr's row and chunk for K (keys
// 16 nn.., dims 16 kk..) and bt_frag_addr's for V (keys 16 kk.., dims 16 nn..).
// Element (row r, chunk c) of a stage's K or V at r * pitch + (c / 8) * line + (swz(r, c) % 8) * 8.
__host__ __device__ constexpr int k_frag_at(int nn, int kk, int lane) {
    const int r = nn * 16 + (lane / 16) * 8 + lane % 8, c = 2 * kk + (lane / 8) % 2;
    return r * K_ROW_STEP + c / 8 * K_LINE + swz(r, c) % 8 * 8;
}
__host__ __device__ constexpr int v_frag_at(int kk, int nn, int lane) {
    const int r = kk * 16 + ((lane / 8) % 2) * 8 + lane % 8, c = 2 * nn + lane / 16;
    return r * V_ROW_STEP + c / 8 * V_LINE + swz(r, c) % 8 * 8;
}
// A lane's row is lane % 8 within its 8 aligned rows, so its chunk 2 kk + h lies at 8 (kk / 4) + ((2 (kk % 4) + h)
// ^ (lane % 8)): four offsets a lane (by kk % 4 for K, nn % 4 for V) plus constants of the unrolled loops, which
// FragLanes finds once (swizzling every address in the loop cost four instructions an ldmatrix; E = 128: 757 ->
// 694 instructions in the loop). Checked as it compiles: the split offsets are the swizzled ones.
__host__ __device__ constexpr bool frag_split_holds() {
    for (int lane = 0; lane < 32; ++lane) {
        for (int nn = 0; nn < TILE / 16; ++nn)
            for (int kk = 0; kk < KK; ++kk)
                if (k_frag_at(nn, kk, lane) != k_frag_at(0, kk % 4, lane) + nn * 16 * K_ROW_STEP + kk / 4 * K_LINE)
                    return false;
        for (int kk = 0; kk < TILE / 16; ++kk)
            for (int nn = 0; nn < EV_PAD / 16; ++nn)
                if (v_frag_at(kk, nn, lane) != v_frag_at(0, nn % 4, lane) + kk * 16 * V_ROW_STEP + nn / 4 * V_LINE)
                    return false;
    }
    return true;
}
static_assert(frag_split_holds(), "FragLanes: a lane's four offsets and the loops' constants give swz's places");

struct FragLanes {
    u32 k[4], v[4];  // bytes, by kk % 4 for K and nn % 4 for V
    __device__ __forceinline__ explicit FragLanes(int lane) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            k[q] = 2 * k_frag_at(0, q, lane);
            v[q] = 2 * v_frag_at(0, q, lane);
            asm("" : "+r"(k[q]), "+r"(v[q]));  // opaque: held in registers, not recomputed from the lane in the loop
        }
    }
    // by the tiles' shared-window byte addresses
    __device__ __forceinline__ u32 k_at(u32 sK, int nn, int kk) const {
        return sK + k[kk % 4] + 2 * (nn * 16 * K_ROW_STEP + kk / 4 * K_LINE);
    }
    __device__ __forceinline__ u32 v_at(u32 sV, int kk, int nn) const {
        return sV + v[nn % 4] + 2 * (kk * 16 * V_ROW_STEP + nn / 4 * V_LINE);
    }
};

#if SOFTCAP
// softcap * tanh(x / softcap) of the scaled score x, natural units; tanh as 1 - 2 / (e^2y + 1) (the Hopper
// forward's form, exact where it matters), `k` = 2 log2(e) / softcap.
__device__ __forceinline__ float soft_cap(float x, float k, float softcap) {
    return softcap * (1.f - 2.f / (exp2f(x * k) + 1.f));
}
#endif

// The merge of the splits by the CTA of a (b, kvh) that finished last, exactly: M = max m_s, out = sum_s O_s
// 2^(m_s - M) / sum_s l_s 2^(m_s - M), lse = (M + log2 sum) ln 2; splits that saw nothing of the row (m_s =
// -inf) are left out. Its R rows (b, h, query), each over every split's (m, l) and O. A warp finds the
// weights of its rows (lane s: splits s, s + 32, ...) into shared memory (`weight`: [ROWS][SPLIT_SLOTS]
// floats, then the rows' totals and maxima); then each thread sums column pairs over the splits. The other
// CTAs' partials are read past L1 (ld.global.cg): they were written on other SMs. The merge is the call's tail
// (one CTA a (b, kvh), after every split), and its sum a chain of L2 round trips, a batch of DEC_MERGE_UNROLL
// predicated loads each (any split count: a loop unrolled by the compiler left the remainder's loads one trip
// each): at B = 1 S = 32768 (32 splits) 8 loads a batch make 4 trips a column pair, 32 one.
// a row's weight slots: DEC_MAX_SPLITS in whole warps (lane s holds splits s, s + 32, ...), also where a knob
// asks for fewer than 32
constexpr int SPLIT_SLOTS = (DEC_MAX_SPLITS + 31) / 32 * 32;
__device__ __noinline__ void merge_splits(const float* __restrict__ o_part, const float* __restrict__ ml_part,
                                         elem_t* __restrict__ out, float* __restrict__ lse, float* weight, int splits,
                                         int rows, int R, int b, int kvh, int group, int Hq, int Lq) {
    float* total = weight + ROWS * SPLIT_SLOTS;
    float* top = total + ROWS;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    auto bhl_of = [&](int row) { return ((long long)b * Hq + kvh * group + row / Lq) * Lq + row % Lq; };
    for (int row = warp; row < R; row += NTHREADS / 32) {
        const long long bhl = bhl_of(row);
        float m[SPLIT_SLOTS / 32], l[SPLIT_SLOTS / 32];
        float mx = -CUSDPA_INF;
#pragma unroll
        for (int k = 0; k < SPLIT_SLOTS / 32; ++k) {
            const int s = lane + 32 * k;
            const float2 ml = s < splits ? __ldcg(reinterpret_cast<const float2*>(ml_part + 2 * (s * (long long)rows + bhl)))
                                         : make_float2(-CUSDPA_INF, 0.f);
            m[k] = ml.x;
            l[k] = ml.y;
            mx = fmaxf(mx, m[k]);
        }
        for (int d = 16; d; d /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, d));
        const float m_use = mx == -CUSDPA_INF ? 0.f : mx;
        float sum = 0.f;
#pragma unroll
        for (int k = 0; k < SPLIT_SLOTS / 32; ++k) {
            const float w = m[k] == -CUSDPA_INF ? 0.f : exp2f(m[k] - m_use);
            weight[row * SPLIT_SLOTS + lane + 32 * k] = w;
            sum += m[k] == -CUSDPA_INF ? 0.f : l[k] * w;
        }
        for (int d = 16; d; d /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, d);
        if (lane == 0) {
            total[row] = sum;
            top[row] = mx;
        }
    }
    __syncthreads();
    for (int x = threadIdx.x; x < R * (HEAD_DIM_V / 2); x += NTHREADS) {
        const int row = x / (HEAD_DIM_V / 2), e = 2 * (x % (HEAD_DIM_V / 2));
        const long long bhl = bhl_of(row);
        const float* o_row = o_part + bhl * HEAD_DIM_V + e;
        float o0 = 0.f, o1 = 0.f;
        for (int s0 = 0; s0 < splits; s0 += MERGE_UNROLL) {  // a batch's loads issued together, then summed
            float2 part[MERGE_UNROLL];
#pragma unroll
            for (int u = 0; u < MERGE_UNROLL; ++u)
                part[u] = s0 + u < splits
                              ? __ldcg(reinterpret_cast<const float2*>(o_row + (s0 + u) * (long long)rows * HEAD_DIM_V))
                              : make_float2(0.f, 0.f);
#pragma unroll
            for (int u = 0; u < MERGE_UNROLL; ++u)
                if (s0 + u < splits) add_part(o0, o1, part[u], weight[row * SPLIT_SLOTS + s0 + u]);
        }
        const int h = kvh * group + row / Lq, ql = row % Lq;
        *reinterpret_cast<u32*>(out + (((long long)b * Lq + ql) * Hq + h) * HEAD_DIM_V + e) =
            merged_pair(o0, o1, total[row]);
        if (e == 0) lse[bhl] = merged_lse(top[row], total[row]);
    }
}

extern "C" __global__ void __launch_bounds__(NTHREADS)
flash_decode_split(
#if DEC_TMA
                   const __grid_constant__ TmaMap tm_k, const __grid_constant__ TmaMap tm_v,
#endif
                   const elem_t* __restrict__ q, const elem_t* __restrict__ k_cache, const elem_t* __restrict__ v_cache,
                   const int* __restrict__ table, const int* __restrict__ seqlens, const float* __restrict__ slopes,
                   elem_t* __restrict__ out, float* __restrict__ lse, float* __restrict__ o_part,
                   float* __restrict__ ml_part, int* __restrict__ arrivals,
                   int B, int Hq, int group, int Lq, long long q_sb, long long q_sl,
                   long long q_sh, long long table_sb, long long k_sr, long long k_ss, long long k_sh, long long v_sr,
                   long long v_ss, long long v_sh, int block_size, int capacity, int fixed_len, int n_new, float scale,
                   float softcap, int left, int right) {
    extern __shared__ __align__(128) unsigned char smem_raw[];  // (stage rows are whole 128-byte lines)
    PhaseClock clock;
#if DEC_TMA
    elem_t* sPipe = reinterpret_cast<elem_t*>(smem_raw + ((1024 - smem_u32(smem_raw) % 1024) % 1024));
    elem_t* sQ = sPipe + PIPE_BYTES / 2;
    // a stage's K block landed, its V block landed, the stage released by every warp
    __shared__ unsigned long long full_k[STAGES], full_v[STAGES], empty[STAGES];
#else
    elem_t* sQ = reinterpret_cast<elem_t*>(smem_raw);
    elem_t* sPipe = sQ + SQ_ELEMS;
#endif

    const int Hkv = Hq / group, b = blockIdx.y / Hkv, kvh = blockIdx.y % Hkv, split = blockIdx.x;
    const int splits = gridDim.x, R = group * Lq;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int n_keys = min(max((seqlens ? seqlens[b] : fixed_len) + n_new, 0), capacity);
    // this split's keys, whole tiles (DEC_TMA: blocks); then only those some row sees
    constexpr int UNIT = DEC_TMA ? NW * TILE : TILE;
    const int per_split = (n_keys + splits - 1) / splits;
    const int chunk = (per_split + UNIT - 1) / UNIT * UNIT;
    const Visibility<int> vis{Lq, n_keys, n_keys - Lq, left, right};
    int lo, hi;
    vis.key_range(0, Lq, lo, hi);
    lo = max(lo, split * chunk);
    hi = min(hi, split * chunk + chunk);

    // Q rows, zero past R
    const elem_t* qb = q + b * q_sb + (long long)(kvh * group) * q_sh;
    for (int c = threadIdx.x; c < ROWS * (E_PAD / 8); c += NTHREADS) {
        const int r = c / (E_PAD / 8), ch = c % (E_PAD / 8);
        const bool pred = r < R && ch * 8 < HEAD_DIM;
        cp_async_16(sQ + r * Q_PITCH + ch * 8, pred ? qb + (r / Lq) * q_sh + (r % Lq) * q_sl + ch * 8 : qb, pred);
    }
    cp_async_commit();

#if DEC_TMA
    // the split's blocks first_block + i, i < count
    const int first_block = lo / BLOCK, count = lo < hi ? (hi - 1) / BLOCK - first_block + 1 : 0;
    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(&full_k[s], 1);
            mbar_init(&full_v[s], 1);
            mbar_init(&empty[s], NW);
        }
        mbar_init_fence();
    }
#else
    const Cache cache{table, table_sb, k_sr, k_ss, v_sr, v_ss, block_size};
    const elem_t* kb = k_cache + kvh * k_sh;
    const elem_t* vb = v_cache + kvh * v_sh;
    elem_t* sK0 = sPipe + warp * STAGES * STAGE_ELEMS;
    // this warp's tiles: first + warp + NW * i, i < count
    const int first = lo / TILE, last = lo < hi ? (hi - 1) / TILE : first - 1;
    const int count = last >= first + warp ? (last - first - warp) / NW + 1 : 0;
    // the offsets of this warp's tile t (key_offsets), and its copy into stage t % STAGES
    const bool affine = !PAGED || block_size % TILE == 0;
    auto offsets = [&](int t, long long& k, long long& v) {
        const int j0 = (first + warp + NW * t) * TILE;
        if (affine)
            key_offsets<true>(cache, b, j0, lo, hi, lane, k, v);
        else
            key_offsets<false>(cache, b, j0, lo, hi, lane, k, v);
    };
    auto copy = [&](int t, long long k, long long v) {
        const int j0 = (first + warp + NW * t) * TILE;
        elem_t* sK = sK0 + (t % STAGES) * STAGE_ELEMS;
        if (affine)
            load_keys<true>(sK, sK + TILE * K_ROW, kb, vb, cache, k, v, j0, lo, hi, lane);
        else
            load_keys<false>(sK, sK + TILE * K_ROW, kb, vb, cache, k, v, j0, lo, hi, lane);
    };
    long long ko, vo;  // the offsets of the next tile to copy
#pragma unroll
    for (int t = 0; t < STAGES - 1; ++t) {
        if (t < count) {
            offsets(t, ko, vo);
            copy(t, ko, vo);
        }
        cp_async_commit();
    }
    offsets(STAGES - 1, ko, vo);
#endif

    // the query of this thread's rows g and g + 8; padding rows see nothing (i = Lq); and the keys [row_lo,
    // row_hi) each row sees within this split: the per-element rule as two limits, found once
    int row_i[2], row_lo[2], row_hi[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        row_i[r] = g + 8 * r < R ? (g + 8 * r) % Lq : Lq;
        vis.row_keys(row_i[r], row_lo[r], row_hi[r]);
        row_lo[r] = max(row_lo[r], lo);
        row_hi[r] = min(row_hi[r], hi);
    }
#if ALIBI
    float slope[2];  // of the rows' query heads (B, Hq)
#pragma unroll
    for (int r = 0; r < 2; ++r) slope[r] = slopes[b * Hq + kvh * group + min(g + 8 * r, R - 1) / Lq];
#endif
#if SOFTCAP
    const float cap_k = 2.f * LOG2E / softcap;
#endif

    cp_async_wait<DEC_TMA ? 0 : STAGES - 1>();  // Q has landed (the first group)
    __syncthreads();  // (and DEC_TMA's barriers are initialised)
    float acc[1][VT][4];
#pragma unroll
    for (int vt = 0; vt < VT; ++vt) acc[0][vt][0] = acc[0][vt][1] = acc[0][vt][2] = acc[0][vt][3] = 0.f;
    float m_i[2] = {-CUSDPA_INF, -CUSDPA_INF}, l_i[2] = {0.f, 0.f};

#if DEC_TMA
    if (warp == NW) {  // the producer: block i into stage i % STAGES once every warp released what it held
        if (lane == 0) {
            for (int i = 0; i < count; ++i) {
                const int s = i % STAGES, j0 = (first_block + i) * BLOCK;
                mbar_wait(&empty[s], (i / STAGES + 1) % 2);
#if PAGED
                const int row = table[b * table_sb + j0 / block_size], slot = j0 % block_size;
#else
                const int row = table ? table[b] : b, slot = j0;
#endif
                unsigned char* stage = reinterpret_cast<unsigned char*>(sPipe + s * NW * STAGE_ELEMS);
                mbar_expect_tx(&full_k[s], BLOCK * K_ROW * 2);
#pragma unroll
                for (int h = 0; h < K_ROW / 64; ++h)
                    tma_load(stage + h * K_LINE * 2, tm_k, &full_k[s], h * 64, kvh, slot, row);
                stage += BLOCK * K_ROW * 2;
                mbar_expect_tx(&full_v[s], BLOCK * V_ROW * 2);
#pragma unroll
                for (int h = 0; h < V_ROW / 64; ++h)
                    tma_load(stage + h * V_LINE * 2, tm_v, &full_v[s], h * 64, kvh, slot, row);
            }
        }
        __syncwarp();
        clock.to(PH_ISSUE);  // (the producer's loop: its copies and its waits for free stages)
    } else {
#endif
    u32 qf[KK][4];
#pragma unroll
    for (int kk = 0; kk < KK; ++kk) ldmatrix_x4(qf[kk], a_frag_addr(sQ + kk * 16, Q_PITCH, lane));
    clock.to(PH_START);
    const float scale_log2 = scale * LOG2E;
    const FragLanes frags(lane);

    // The warp's tile of keys [j0, j0 + TILE), K and V at shared-window addresses sK, sV: S, the online
    // softmax, `before_pv()` (DEC_TMA: V's wait), O += P V.
    auto attend = [&](u32 sK, u32 sV, int j0, auto before_pv) {
        float s[1][NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) s[0][nt][0] = s[0][nt][1] = s[0][nt][2] = s[0][nt][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KK; ++kk)
#pragma unroll
            for (int nn = 0; nn < TILE / 16; ++nn) {
                u32 bf[4];
                ldmatrix_x4(bf, frags.k_at(sK, nn, kk));
                mma_16816<IS_BF16>(s[0][2 * nn], qf[kk], bf[0], bf[1]);
                mma_16816<IS_BF16>(s[0][2 * nn + 1], qf[kk], bf[2], bf[3]);
            }
        clock.to(PH_WAIT_S);

        // Scores to log2 units, unseen ones -inf (a select: a NaN product stays out of unseen keys), then the
        // online softmax. A tile every row sees whole (most of a long cache) takes the branch without a
        // per-element test: with the test the compiler kept the 32 comparisons in a packed predicate word
        // across the tile's products, a hundred instructions a tile. (Padding rows need no mask: their Q is
        // zero and they are never written.)
        float alpha[2];
        bool rescale = false;
        auto softmax = [&](auto full_tile) {
            constexpr bool FULL = decltype(full_tile)::value;
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float mx = -CUSDPA_INF;
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int c = 0; c < 2; ++c) {
                        const int j = j0 + nt * 8 + 2 * t + c;
                        float x = s[0][nt][2 * r + c];
#if SOFTCAP || ALIBI
                        x *= scale;
#if SOFTCAP
                        x = soft_cap(x, cap_k, softcap);
#endif
#if ALIBI
                        x -= slope[r] * static_cast<float>(abs(row_i[r] + n_keys - Lq - j));
#endif
                        x *= LOG2E;
#else
                        x *= scale_log2;
#endif
                        if (!FULL) x = j >= row_lo[r] && j < row_hi[r] ? x : -CUSDPA_INF;
                        s[0][nt][2 * r + c] = x;
                        mx = fmaxf(mx, x);  // fmaxf skips NaN: a NaN score poisons the row through its p
                    }
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float m_new = fmaxf(m_i[r], mx);
                // a row with nothing visible yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN
                const float m_use = m_new == -CUSDPA_INF ? 0.f : m_new;
                alpha[r] = exp2f(m_i[r] - m_use);
                rescale |= m_new != m_i[r];
                m_i[r] = m_new;
                float sum = 0.f;
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int c = 0; c < 2; ++c) {
                        const float p = exp2f(s[0][nt][2 * r + c] - m_use);
                        s[0][nt][2 * r + c] = p;
                        sum += p;
                    }
                l_i[r] = l_i[r] * alpha[r] + sum;
            }
        };
        if (vis.tile_full(0, Lq, j0, TILE) && j0 >= lo && j0 + TILE <= hi)
            softmax(Flag<true>{});
        else
            softmax(Flag<false>{});
        if (__any_sync(0xffffffffu, rescale)) {
#pragma unroll
            for (int vt = 0; vt < VT; ++vt)
#pragma unroll
                for (int c = 0; c < 4; ++c) acc[0][vt][c] *= alpha[c / 2];
        }
        clock.to(PH_SOFTMAX);
        before_pv();
        mma_pb_at<1, EV_PAD / 16, TILE / 16>(acc, s, Identity{},
                                             [&](int kk, int nn) { return frags.v_at(sV, kk, nn); });
        __syncwarp();  // every lane is done with this stage before it is refilled
        clock.to(PH_WAIT_PV);
        clock.count(PH_BLOCKS);
    };

#if DEC_TMA
    for (int i = 0; i < count; ++i) {
        const int s = i % STAGES, j0 = (first_block + i) * BLOCK + warp * TILE;
        elem_t* sK = sPipe + s * NW * STAGE_ELEMS + warp * TILE * K_ROW_STEP;
        elem_t* sV = sPipe + s * NW * STAGE_ELEMS + BLOCK * K_ROW + warp * TILE * V_ROW_STEP;
        mbar_wait_warp(&full_k[s], (i / STAGES) % 2);
        clock.to(PH_WAIT_K);
        if (j0 + TILE > lo && j0 < hi) {  // (warp-uniform) some row sees a key of this warp's tile
            // V lands while S and the softmax run; then the V rows of unseen keys are zeroed (P is 0 there, a
            // stale NaN is not). (A warp that skips its tile never waits for V: some warp of the block reads
            // it, and the stage is refilled only once that warp has released it.)
            attend(smem_u32(sK), smem_u32(sV), j0, [&] {
                mbar_wait_warp(&full_v[s], (i / STAGES) % 2);
                if (j0 < lo || j0 + TILE > hi) {
                    for (int c = lane; c < TILE * (V_ROW / 8); c += 32) {
                        const int r = c % TILE, ch = c / TILE;
                        if (j0 + r < lo || j0 + r >= hi)
                            *reinterpret_cast<uint4*>(sV + r * V_ROW_STEP + ch / 8 * V_LINE + ch % 8 * 8) =
                                make_uint4(0, 0, 0, 0);
                    }
                    __syncwarp();
                    fence_proxy_async();  // the zeroes before the stage's next TMA writes (the async proxy)
                }
            });
        }
        if (lane == 0) mbar_arrive(&empty[s]);
    }
    }  // the producer and the attending warps meet again
#else
    for (int i = 0; i < count; ++i) {
        {  // refill the stage consumed last iteration, then find the next tile's offsets
            const int t = i + STAGES - 1;
            if (t < count) copy(t, ko, vo);
            cp_async_commit();
            offsets(t + 1, ko, vo);
        }
        clock.to(PH_ISSUE);
        cp_async_wait<STAGES - 1>();  // tile i has landed
        __syncwarp();
        clock.to(PH_WAIT_K);
        const u32 sK = smem_u32(sK0 + (i % STAGES) * STAGE_ELEMS), sV = sK + 2 * TILE * K_ROW;
        attend(sK, sV, (first + warp + NW * i) * TILE, [] {});
    }
    cp_async_wait<0>();
#endif

    // Merge the warps: row sums over the quad, then each warp's (m, l, O) through shared memory.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l_i[r] += __shfl_xor_sync(0xffffffffu, l_i[r], 1);
        l_i[r] += __shfl_xor_sync(0xffffffffu, l_i[r], 2);
    }
    __syncthreads();  // every warp is done with its stages
    float* sO = reinterpret_cast<float*>(sPipe);  // [NW][ROWS][EV_PAD]
    float* sM = sO + NW * ROWS * EV_PAD;           // [NW][ROWS]
    float* sL = sM + NW * ROWS;
#pragma unroll
    for (int r = 0; r < 2 && warp < NW; ++r) {  // (not DEC_TMA's producer)
        const int row = g + 8 * r;
#pragma unroll
        for (int vt = 0; vt < VT; ++vt)
            *reinterpret_cast<float2*>(sO + (warp * ROWS + row) * EV_PAD + vt * 8 + 2 * t) =
                make_float2(acc[0][vt][2 * r], acc[0][vt][2 * r + 1]);
        if (t == 0) {
            sM[warp * ROWS + row] = m_i[r];
            sL[warp * ROWS + row] = l_i[r];
        }
    }
    __syncthreads();

    const bool direct = splits == 1;
    for (int x = threadIdx.x; x < R * (HEAD_DIM_V / 2); x += NTHREADS) {
        const int row = x / (HEAD_DIM_V / 2), e = 2 * (x % (HEAD_DIM_V / 2));
        float m = -CUSDPA_INF;
#pragma unroll
        for (int w = 0; w < NW; ++w) m = fmaxf(m, sM[w * ROWS + row]);
        const float m_use = m == -CUSDPA_INF ? 0.f : m;
        float l = 0.f, o0 = 0.f, o1 = 0.f;
#pragma unroll
        for (int w = 0; w < NW; ++w) {
            const float mw = sM[w * ROWS + row];
            if (mw == -CUSDPA_INF) continue;  // that warp saw nothing of the row (its O may be 0 * NaN)
            const float f = exp2f(mw - m_use);
            const float2 ow = *reinterpret_cast<const float2*>(sO + (w * ROWS + row) * EV_PAD + e);
            l += sL[w * ROWS + row] * f;
            o0 += ow.x * f;
            o1 += ow.y * f;
        }
        const int h = kvh * group + row / Lq, ql = row % Lq;
        const long long bhl = ((long long)b * Hq + h) * Lq + ql;
        if (direct) {
            *reinterpret_cast<u32*>(out + (((long long)b * Lq + ql) * Hq + h) * HEAD_DIM_V + e) = merged_pair(o0, o1, l);
            if (e == 0) lse[bhl] = merged_lse(m, l);
        } else {
            const long long part = (long long)split * B * Hq * Lq + bhl;
            *reinterpret_cast<float2*>(o_part + part * HEAD_DIM_V + e) = make_float2(o0, o1);
            if (e == 0) {
                ml_part[2 * part] = m;
                ml_part[2 * part + 1] = l;
            }
        }
    }
    static_assert(ROWS * (SPLIT_SLOTS + 2) * 4 <= PIPE_BYTES, "the merge's weights fit in the pipeline's memory");
    clock.to(PH_EPILOGUE);
    if (!direct) {
        // One arrival per CTA, as a grid-wide barrier arrives: the CTA's partial writes ordered before thread 0 by
        // the barrier, then made visible device-wide by its fence before the count moves; the CTA that brings
        // the count to `splits` fences again before its threads read the others' partials (after the barrier).
        __shared__ int last;
        __syncthreads();
        if (threadIdx.x == 0) {
            __threadfence();
            last = atomicAdd(arrivals + blockIdx.y, 1) == splits - 1;
            if (last) {
                __threadfence();
                arrivals[blockIdx.y] = 0;  // every split has counted: left zeroed for the next launch
            }
        }
        __syncthreads();
        if (last)
            merge_splits(o_part, ml_part, out, lse, reinterpret_cast<float*>(sPipe), splits, B * Hq * Lq, R,
                         blockIdx.y / Hkv, blockIdx.y % Hkv, group, Hq, Lq);
    }
    clock.to(PH_END);
}

// New keys and values into the cache before the attention: token n of sequence b goes to position
// seqlens[b] + n (seqlens == nullptr: fixed_len + n), found as the split kernel finds it; positions past the
// capacity are dropped (the split kernel clamps its lengths the same way). One CTA per (b, n), blockIdx.x
// = b * Lnew + n; new tensors (B, Lnew, Hkv, E / Ev) with strides (sb, sl, sh).
extern "C" __global__ void __launch_bounds__(128)
kv_cache_append(elem_t* __restrict__ k_cache, elem_t* __restrict__ v_cache, const elem_t* __restrict__ key,
                const elem_t* __restrict__ value, const int* __restrict__ table, const int* __restrict__ seqlens,
                int fixed_len, int Hkv, int Lnew, long long kn_sb, long long kn_sl, long long kn_sh, long long vn_sb,
                long long vn_sl, long long vn_sh, long long table_sb, long long k_sr, long long k_ss, long long k_sh,
                long long v_sr, long long v_ss, long long v_sh, int block_size, int capacity) {
    const int b = blockIdx.x / Lnew, n = blockIdx.x % Lnew;
    const int p = (seqlens ? seqlens[b] : fixed_len) + n;
    if (p < 0 || p >= capacity) return;
    const Cache cache{table, table_sb, k_sr, k_ss, v_sr, v_ss, block_size};
    long long ko, vo;
    cache.at(b, p, ko, vo);
    constexpr int KC = HEAD_DIM / 8, VC = HEAD_DIM_V / 8;  // 16-byte chunks of a head's row
    for (int c = threadIdx.x; c < Hkv * KC; c += blockDim.x) {
        const int h = c / KC, ch = c % KC;
        *reinterpret_cast<uint4*>(k_cache + ko + h * k_sh + ch * 8) =
            *reinterpret_cast<const uint4*>(key + b * kn_sb + n * kn_sl + h * kn_sh + ch * 8);
    }
    for (int c = threadIdx.x; c < Hkv * VC; c += blockDim.x) {
        const int h = c / VC, ch = c % VC;
        *reinterpret_cast<uint4*>(v_cache + vo + h * v_sh + ch * 8) =
            *reinterpret_cast<const uint4*>(value + b * vn_sb + n * vn_sl + h * vn_sh + ch * 8);
    }
}
