"""The passes around the fused tensor_core backward (efficient_bwd.cuh with EFF_FUSED), whose dk/dv blocks add
their dQ rows into an fp32 accumulator with atomics: before it, D = rowsum(dout * out) and the accumulator
zeroed (a plan's workspace arrives uninitialised); after it, dq = scale * accumulator in the input type. The
convert pass also rounds a float mask's summed gradient (attention.backward), whose rows are thousands of keys.

A block takes THREADS // cols rows, ``cols`` threads a row on consecutive columns (``launch_shape``), so that a
warp's load touches a few adjacent cache lines: one thread a row had each lane on its own line, one element per
line per instruction. Over the kernels' 6-D views (batch dims, head, row, column); plain Numba, so the CUDA
simulator runs them too (tests/test_efficient_sim.py)."""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda

from . import device
from .layout import cdiv

THREADS = 128
WARP = 32


@device.inline
def _row(t, shape):
    """(b0, b1, b2, head, row) of flat row ``t`` of 6-D views of leading shape ``shape``."""
    r = t
    i = r % shape[4]
    r //= shape[4]
    h = r % shape[3]
    r //= shape[3]
    b2 = r % shape[2]
    r //= shape[2]
    return r // shape[1], r % shape[1], b2, h, i


@functools.cache
def prepare_kernel(bf16: bool):
    load = device.loader(bf16)

    @cuda.jit
    def attention_dq_prepare(out, dout, delta, accum, cols):
        """delta[row] = rowsum(dout * out) in fp32, accum[row, :] = 0; a row's partial sums meet in shared
        memory (the simulator has no warp shuffles), a tree over its cols threads."""
        partial = cuda.shared.array(THREADS, np.float32)
        shape = accum.shape
        slot = cuda.threadIdx.x
        lane = slot % cols
        t = cuda.blockIdx.x * (THREADS // cols) + slot // cols
        live = t < shape[0] * shape[1] * shape[2] * shape[3] * shape[4]
        b0, b1, b2, h, i = _row(t, shape)  # (past the rows: indices never used)
        total = np.float32(0.0)
        if live:
            for e in range(lane, out.shape[5], cols):
                total += load(out[b0, b1, b2, h, i, e]) * load(dout[b0, b1, b2, h, i, e])
            for e in range(lane, shape[5], cols):
                accum[b0, b1, b2, h, i, e] = np.float32(0.0)
        partial[slot] = total
        cuda.syncthreads()
        step = cols // 2
        while step > 0:  # (every thread reaches each barrier: no return above)
            if lane < step:
                partial[slot] += partial[slot + step]
            cuda.syncthreads()
            step //= 2
        if live and lane == 0:
            delta[b0, b1, b2, h, i] = partial[slot]

    return attention_dq_prepare


@functools.cache
def convert_kernel(bf16: bool):
    store = device.storer(bf16)

    @cuda.jit
    def attention_dq_convert(accum, dq, scale, cols):
        """dq[row, e] = scale * accum[row, e] for the head dim of dq (the accumulator's is padded); also a float
        mask's gradient from its fp32 sums (attention.backward, scale 1)."""
        shape = dq.shape
        lane = cuda.threadIdx.x % cols
        t = cuda.blockIdx.x * (THREADS // cols) + cuda.threadIdx.x // cols
        if t >= shape[0] * shape[1] * shape[2] * shape[3] * shape[4]:
            return
        b0, b1, b2, h, i = _row(t, shape)
        s = np.float32(scale)
        for e in range(lane, shape[5], cols):
            dq[b0, b1, b2, h, i, e] = store(accum[b0, b1, b2, h, i, e] * s)

    return attention_dq_convert


def launch_shape(x) -> tuple:
    """(grid, cols) of a pass over the rows of the 6-D view ``x`` in blocks of THREADS: cols, the kernels' last
    argument, is the power of two that covers a row's columns, at most a warp (a row's threads then share a
    warp). The blocks are one-dimensional, as a plan's recorded launches must be (cusdpa.backends.efficient)."""
    cols = min(WARP, 1 << max(0, x.shape[5] - 1).bit_length())
    return cdiv(math.prod(x.shape[:5]), THREADS // cols), cols
