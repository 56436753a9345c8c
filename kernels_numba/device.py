"""Device functions shared by the portable kernels: element conversion, Philox dropout, visibility.

Everything here runs both compiled by Numba on a GPU and as Python under the CUDA simulator. The
one place the two differ is the bf16 bit cast: Numba has no bf16 type, so bf16 arrays reach the
kernels as uint16 and are widened by placing the 16 bits on top of an fp32 (bf16 is the upper half
of an fp32). On a GPU that is libdevice's int_as_float; the simulator has no libdevice, so it gets a
NumPy view doing the same cast.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda

try:
    from numba.cuda.core.config import ENABLE_CUDASIM as SIMULATOR
except ImportError:  # older numba-cuda keeps the flag in numba.config
    from numba.config import ENABLE_CUDASIM as SIMULATOR

# Philox4x32-10 constants (Random123), the same as cusdpa/philox.py; tests compare the masks bit for bit.
PHILOX_M0 = np.uint64(0xD2511F53)
PHILOX_M1 = np.uint64(0xCD9E8D57)
PHILOX_W0 = np.uint64(0x9E3779B9)
PHILOX_W1 = np.uint64(0xBB67AE85)
MASK32 = np.uint64(0xFFFFFFFF)
SHIFT32 = np.uint64(32)
NEG_INF = -math.inf

if SIMULATOR:
    @cuda.jit(device=True)
    def bf16_to_f32(bits):
        return np.array([np.uint32(bits) << np.uint32(16)], dtype=np.uint32).view(np.float32)[0]

    @cuda.jit(device=True)
    def f32_bits(x):
        return np.uint32(np.array([x], dtype=np.float32).view(np.uint32)[0])
else:
    from numba.cuda import libdevice

    @cuda.jit(device=True)
    def bf16_to_f32(bits):
        return libdevice.int_as_float(np.int32(bits) << np.int32(16))

    @cuda.jit(device=True)
    def f32_bits(x):
        return np.uint32(libdevice.float_as_int(x))


def inline(fn):
    """A device function inlined into its caller by NVVM: a local array it takes (an accumulator tile)
    then has constant indices once the loops unroll, and stays in registers. The simulator's jit has
    no forceinline option (and no registers)."""
    if SIMULATOR:
        return cuda.jit(device=True)(fn)
    return cuda.jit(device=True, forceinline=True)(fn)


def kernel(max_registers: int):
    """cuda.jit for a kernel whose registers per thread are capped (the simulator has no registers)."""
    if SIMULATOR:
        return cuda.jit
    return cuda.jit(max_registers=max_registers)


@cuda.jit(device=True)
def f32_to_bf16(x):
    """fp32 -> bf16 bits, round to nearest even; NaN stays a (quiet) NaN."""
    bits = f32_bits(np.float32(x))
    if x != x:
        return np.uint16(0x7FC0 | ((bits >> np.uint32(16)) & np.uint32(0x8000)))
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return np.uint16(rounded >> np.uint32(16))


def loader(bf16: bool):
    """Device function turning one stored element into fp32 (bf16 arrays arrive as uint16 bits)."""
    if bf16:
        return bf16_to_f32

    @cuda.jit(device=True)
    def load(x):
        return np.float32(x)

    return load


def storer(bf16: bool):
    """Device function turning an fp32 value into what the output array stores (the array casts others)."""
    if bf16:
        return f32_to_bf16

    @cuda.jit(device=True)
    def store(x):
        return x

    return store


@cuda.jit(device=True)
def philox_words(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 of (counter, key); each 32-bit word is carried in a uint64 so nothing overflows."""
    for _ in range(10):
        p0 = c0 * PHILOX_M0
        p1 = c2 * PHILOX_M1
        c0, c1, c2, c3 = ((p1 >> SHIFT32) ^ c1 ^ k0, p1 & MASK32, (p0 >> SHIFT32) ^ c3 ^ k1, p0 & MASK32)
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


@cuda.jit(device=True)
def philox_group(j, i, bh, offset, seed_lo, seed_hi):
    """The four dropout words of key columns 4*(j//4) .. +3 for query row i of batch-head bh."""
    return philox_words(np.uint64(j // 4), np.uint64(i), np.uint64(bh), np.uint64(offset),
                        np.uint64(seed_lo), np.uint64(seed_hi))


@cuda.jit(device=True)
def pick_word(words, j):
    w0, w1, w2, w3 = words
    r = j % 4
    if r == 0:
        return w0
    if r == 1:
        return w1
    if r == 2:
        return w2
    return w3


@cuda.jit(device=True)
def keep_scale(j, i, bh, offset, seed_lo, seed_hi, threshold, rescale):
    """Dropout factor of one element: rescale = 1/(1-p) when kept, 0 when dropped."""
    word = pick_word(philox_group(j, i, bh, offset, seed_lo, seed_hi), j)
    return rescale if word < np.uint64(threshold) else np.float32(0.0)


# Causal/window visibility of key j to query i. ``shift`` is S - L for lower-right alignment (else 0),
# so the aligned diagonal is j == i + shift; ``left``/``right`` bound the window around it, -1 meaning
# unbounded. Runtime arguments, not compile-time ones: a branch costs less than another compile.


@cuda.jit(device=True)
def visible(i, j, causal, shift, left, right):
    d = j - i - shift
    if causal and d > 0:
        return False
    if left >= 0 and d < -left:
        return False
    if right >= 0 and d > right:
        return False
    return True


@cuda.jit(device=True)
def key_range(i_first, i_last, causal, shift, S, left, right):
    """[lo, hi): the keys some query row in [i_first, i_last] may see."""
    lo = 0
    hi = S
    if left >= 0:
        lo = max(0, i_first + shift - left)
    if causal:
        hi = min(hi, i_last + shift + 1)
    if right >= 0:
        hi = min(hi, i_last + shift + right + 1)
    return lo, max(lo, hi)


@cuda.jit(device=True)
def query_range(j_first, j_last, causal, shift, L, left, right):
    """[lo, hi): the query rows that may see some key in [j_first, j_last]."""
    lo = 0
    hi = L
    if causal:
        lo = max(lo, j_first - shift)
    if right >= 0:
        lo = max(lo, j_first - shift - right)
    if left >= 0:
        hi = min(hi, j_last - shift + left + 1)
    return lo, max(lo, hi)
