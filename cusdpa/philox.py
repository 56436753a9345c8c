"""Counter-based Philox4x32-10 and the dropout keep-mask of docs/DESIGN.md, vectorised over any array module.

The keep decision for query row i, key column j of flattened batch-head ``bh`` is a pure function of
(seed, offset, bh, i, j): counter = (j // 4, i, bh, offset), key = (seed lo, seed hi), word j % 4 of
the output, kept iff word < keep_threshold(p). Every backend (CUDA C, Numba, this module on NumPy or
CuPy) computes the same function, so forward, backward and the reference agree bit for bit.
"""
from __future__ import annotations

import numpy as np

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9  # golden ratio
PHILOX_W1 = 0xBB67AE85  # sqrt(3) - 1
PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF


def _mulhilo(m: int, x, xp):
    # A 32x32 -> 64-bit product is exact in uint64; split it into the high and low words.
    prod = xp.asarray(x, dtype=xp.uint64) * xp.uint64(m)
    return (prod >> xp.uint64(32)).astype(xp.uint32), (prod & xp.uint64(_MASK32)).astype(xp.uint32)


def philox4x32_10(counter, key, xp=np):
    """Philox4x32-10 of Random123: ``counter`` is four uint32 arrays (broadcastable), ``key`` two ints.

    Returns the four uint32 output words. Round i uses the key bumped i times by the Weyl constants.
    """
    c0, c1, c2, c3 = (xp.asarray(c, dtype=xp.uint32) for c in counter)
    k0, k1 = int(key[0]) & _MASK32, int(key[1]) & _MASK32
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0, xp)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2, xp)
        c0, c1, c2, c3 = hi1 ^ c1 ^ xp.uint32(k0), lo1, hi0 ^ c3 ^ xp.uint32(k1), lo0
        k0, k1 = (k0 + PHILOX_W0) & _MASK32, (k1 + PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def keep_threshold(dropout_p: float) -> int:
    """An element survives dropout iff its 32-bit Philox word is below this value."""
    return min(_MASK32, int(np.floor((1.0 - dropout_p) * 2.0**32)))


def keep_mask(seed: int, offset: int, bh, L: int, S: int, dropout_p: float, xp=np):
    """Boolean keep-mask of shape ``bh.shape + (L, S)`` for the flattened batch-head indices ``bh``.

    ``bh`` is an integer array (or int); rows and columns are 0..L-1 and 0..S-1. The mask is made
    group by group of four columns, one Philox call per (bh, i, j // 4), as the kernels do.
    """
    bh = xp.asarray(bh, dtype=xp.uint32)
    threshold = xp.uint32(keep_threshold(dropout_p))
    ngroups = (S + 3) // 4
    c0 = xp.arange(ngroups, dtype=xp.uint32)
    c1 = xp.arange(L, dtype=xp.uint32)[:, None]
    c2 = bh.reshape(bh.shape + (1, 1))
    c3 = xp.uint32(offset & _MASK32)
    words = philox4x32_10((c0, c1, c2, c3), (seed & _MASK32, (seed >> 32) & _MASK32), xp)
    # Interleave the four words so that column j reads word j % 4 of group j // 4.
    full = xp.stack([xp.broadcast_to(w, bh.shape + (L, ngroups)) for w in words], axis=-1)
    return full.reshape(bh.shape + (L, ngroups * 4))[..., :S] < threshold
