/* A stand-in for libcuda.so.1 for the CPU tests of interop/native/replay.cpp (CUSDPA_LIBCUDA points at it):
 * cuLaunchKernel calls the "kernel" as a host function of the launch's parameters, so a test's kernels below
 * compute on CPU tensors and show what the replay passed them. Tensors are float32, n elements each. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef void (*host_kernel)(void** params, unsigned gx, unsigned gy, unsigned bx, unsigned smem);

int launches = 0;              /* kernels launched */
unsigned last_grid[2], last_block, last_smem;
unsigned long long memset_dst; /* the last memset's address and words */
size_t memset_words;
int map_ok = -1;               /* the forward's map held q's address at its address word (1) or not (0) */

int cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                   unsigned smem, void* stream, void** params, void** extra) {
    (void)gz, (void)by, (void)bz, (void)stream, (void)extra;
    ++launches;
    last_grid[0] = gx, last_grid[1] = gy, last_block = bx, last_smem = smem;
    ((host_kernel)f)(params, gx, gy, bx, smem);
    return 0;
}
int cuMemsetD32Async(unsigned long long dst, unsigned value, size_t n, void* stream) {
    (void)stream;
    for (size_t i = 0; i < n; ++i) ((uint32_t*)dst)[i] = value;
    memset_dst = dst, memset_words = n;
    return 0;
}
int cuCtxGetCurrent(void** ctx) { *ctx = (void*)1; return 0; }
int cuCtxSetCurrent(void* ctx) { (void)ctx; return 0; }
int cuDevicePrimaryCtxRetain(void** ctx, int dev) { (void)dev; *ctx = (void*)1; return 0; }
int cuDeviceGet(int* dev, int ordinal) { *dev = ordinal; return 0; }

#define CELL(i, type) (*(type*)params[i])
#define PTR(i) ((float*)(uintptr_t)CELL(i, uint64_t))

/* params: q, k, v, o, lse, seed_lo (u32), seed_hi (u32), n (i64), rows (i64), a map of q (16 words, q's
 * address at word 2). o = q + 3 k + 2 v; lse[r] = seed_lo + r, lse[0] also + seed_hi. */
void fake_forward(void** params, unsigned gx, unsigned gy, unsigned bx, unsigned smem) {
    (void)gx, (void)gy, (void)bx, (void)smem;
    float *q = PTR(0), *k = PTR(1), *v = PTR(2), *o = PTR(3), *lse = PTR(4);
    const uint32_t lo = CELL(5, uint32_t), hi = CELL(6, uint32_t);
    const int64_t n = CELL(7, int64_t), rows = CELL(8, int64_t);
    const uint64_t* map = (const uint64_t*)params[9];
    map_ok = map[2] == (uint64_t)(uintptr_t)q;
    for (int64_t i = 0; i < n; ++i) o[i] = q[i] + 3.f * k[i] + 2.f * v[i];
    for (int64_t r = 0; r < rows; ++r) lse[r] = (float)lo + (float)r;
    lse[0] += (float)hi;
}

/* params: do, dq, dk, dv, delta, dq_accum, n (i64), rows (i64). dq = do (+ the workspace's first word, which
 * the plan's memset zeroed), dk = 3 do, dv = 2 do. */
void fake_backward(void** params, unsigned gx, unsigned gy, unsigned bx, unsigned smem) {
    (void)gx, (void)gy, (void)bx, (void)smem;
    float *dout = PTR(0), *dq = PTR(1), *dk = PTR(2), *dv = PTR(3), *delta = PTR(4), *acc = PTR(5);
    const int64_t n = CELL(6, int64_t), rows = CELL(7, int64_t);
    for (int64_t r = 0; r < rows; ++r) delta[r] = 0.f;
    for (int64_t i = 0; i < n; ++i) {
        dq[i] = dout[i] + acc[0];
        dk[i] = 3.f * dout[i];
        dv[i] = 2.f * dout[i];
    }
}

/* params: q, k, v, mask, o, n (i64). o = q + 3 k + 2 v + mask: an attn_mask read through its slot. */
void fake_masked_forward(void** params, unsigned gx, unsigned gy, unsigned bx, unsigned smem) {
    (void)gx, (void)gy, (void)bx, (void)smem;
    float *q = PTR(0), *k = PTR(1), *v = PTR(2), *mask = PTR(3), *o = PTR(4);
    const int64_t n = CELL(5, int64_t);
    for (int64_t i = 0; i < n; ++i) o[i] = q[i] + 3.f * k[i] + 2.f * v[i] + mask[i];
}

/* params: q, k, v, mask, seen, blocks, o, n (i64): the kernels of a plan that reads a mask's summary (float
 * buffers of n here). o = q + 3 k + 2 v + mask + seen + blocks. */
void fake_summarised_forward(void** params, unsigned gx, unsigned gy, unsigned bx, unsigned smem) {
    (void)gx, (void)gy, (void)bx, (void)smem;
    float *q = PTR(0), *k = PTR(1), *v = PTR(2), *mask = PTR(3), *seen = PTR(4), *blocks = PTR(5), *o = PTR(6);
    const int64_t n = CELL(7, int64_t);
    for (int64_t i = 0; i < n; ++i) o[i] = q[i] + 3.f * k[i] + 2.f * v[i] + mask[i] + seen[i] + blocks[i];
}

/* params: do, seen, blocks, dq, dk, dv, n (i64). dq = seen * do, dk = blocks * do, dv = do. */
void fake_summarised_backward(void** params, unsigned gx, unsigned gy, unsigned bx, unsigned smem) {
    (void)gx, (void)gy, (void)bx, (void)smem;
    float *dout = PTR(0), *seen = PTR(1), *blocks = PTR(2), *dq = PTR(3), *dk = PTR(4), *dv = PTR(5);
    const int64_t n = CELL(6, int64_t);
    for (int64_t i = 0; i < n; ++i) {
        dq[i] = seen[i] * dout[i];
        dk[i] = blocks[i] * dout[i];
        dv[i] = dout[i];
    }
}
