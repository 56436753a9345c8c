"""The passes around the fused tensor_core backward (efficient_bwd.cuh with EFF_FUSED), whose dk/dv blocks add
their dQ rows into an fp32 accumulator with atomics: before it, D = rowsum(dout * out) and the accumulator
zeroed (a plan's workspace arrives uninitialised); after it, dq = scale * accumulator in the input type.

One thread per query row over the kernels' 6-D views (batch dims, head, row, head dim); plain Numba, so the
CUDA simulator runs them too (tests/test_efficient_sim.py)."""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda

from . import device

THREADS = 128


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
    def attention_dq_prepare(out, dout, delta, accum):
        """delta[row] = rowsum(dout * out) in fp32, accum[row, :] = 0."""
        shape = accum.shape
        t = cuda.blockIdx.x * THREADS + cuda.threadIdx.x
        if t >= shape[0] * shape[1] * shape[2] * shape[3] * shape[4]:
            return
        b0, b1, b2, h, i = _row(t, shape)
        total = np.float32(0.0)
        for e in range(out.shape[5]):
            total += load(out[b0, b1, b2, h, i, e]) * load(dout[b0, b1, b2, h, i, e])
        delta[b0, b1, b2, h, i] = total
        for e in range(shape[5]):
            accum[b0, b1, b2, h, i, e] = np.float32(0.0)

    return attention_dq_prepare


@functools.cache
def convert_kernel(bf16: bool):
    store = device.storer(bf16)

    @cuda.jit
    def attention_dq_convert(accum, dq, scale):
        """dq[row, e] = scale * accum[row, e] for the head dim of dq (the accumulator's is padded); also a float
        mask's gradient from its fp32 sums (attention.backward, scale 1)."""
        shape = dq.shape
        t = cuda.blockIdx.x * THREADS + cuda.threadIdx.x
        if t >= shape[0] * shape[1] * shape[2] * shape[3] * shape[4]:
            return
        b0, b1, b2, h, i = _row(t, shape)
        s = np.float32(scale)
        for e in range(shape[5]):
            dq[b0, b1, b2, h, i, e] = store(accum[b0, b1, b2, h, i, e] * s)

    return attention_dq_convert


def rows(x) -> int:
    """Query rows of a 6-D view: one thread each."""
    return math.prod(x.shape[:5])
