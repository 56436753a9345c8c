"""Device functions the portable kernels share (kernels_numba.blocked_forward, kernels_numba.gradients): sequence
bounds, batch decoding, visibility and masks.

Layout every kernel sees (built by kernels_numba.layout): rows-of-vectors operands are 6-D views
(B0, B1, B2, H, rows, dim) and per-row scalars (lse, delta) 5-D views (B0, B1, B2, H, rows), with
zero strides where an operand is broadcast, so a broadcast mask or batch is read, never expanded.
Varlen problems come as B0 = B1 = B2 = 1 views over the packed tokens, rows offset by cu_seqlens.
"""
from __future__ import annotations

from numba import cuda

from . import device
from .device import NEG_INF

MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2


def _common(spec):
    """The shared device functions of a kernel specialisation ``spec`` (kernels_numba.gradients.Spec)."""
    load_mask = device.loader(spec.mask_bf16)
    visible, key_range, query_range = device.visible, device.key_range, device.query_range
    VARLEN, MASK = spec.varlen, spec.mask

    @cuda.jit(device=True)
    def sequence(cu_q, cu_k, seq, L, S):
        """(first query row, L, first key row, S) of sequence ``seq`` (dense: the whole problem)."""
        if VARLEN:
            q0 = cu_q[seq]
            k0 = cu_k[seq]
            return q0, cu_q[seq + 1] - q0, k0, cu_k[seq + 1] - k0
        return 0, L, 0, S

    @cuda.jit(device=True)
    def batch_index(flat, nb1, nb2):
        """Flat batch index -> (b0, b1, b2) of the merged batch dims (varlen views have all three 1)."""
        if VARLEN:
            return 0, 0, 0
        return flat // (nb1 * nb2), (flat // nb2) % nb1, flat % nb2

    @cuda.jit(device=True)
    def score(mask, b0, b1, b2, h, i, j, s):
        """Apply the attention mask to a visible pair: -inf means masked (selected out). A -inf float-mask
        entry selects the score out as a False bool entry does, so NaN in q k^T there is never added in."""
        if MASK == MASK_BOOL:
            if not mask[b0, b1, b2, h, i, j]:
                return NEG_INF
        elif MASK == MASK_FLOAT:
            m = load_mask(mask[b0, b1, b2, h, i, j])
            if m == NEG_INF:
                return NEG_INF
            s += m
        return s

    @cuda.jit(device=True)
    def unmasked(mask, b0, b1, b2, h, i, j):
        """Bool masks decide before any arithmetic, so a masked pair never touches its data."""
        if MASK == MASK_BOOL:
            return mask[b0, b1, b2, h, i, j]
        return True

    @cuda.jit(device=True)
    def contributor(own, rep, own1, own2, nb1, nb2):
        """(b0, b1, b2, flat) of the rep-th problem batch element reading own batch element ``own``."""
        o0, o1, o2 = batch_index(own, own1, own2)
        b0, b1, b2 = batch_of(o0, o1, o2, rep, nb1, nb2, own1, own2)
        return b0, b1, b2, own if VARLEN else (b0 * nb1 + b1) * nb2 + b2

    return visible, key_range, query_range, sequence, batch_index, score, unmasked, contributor


@cuda.jit(device=True)
def batch_of(o0, o1, o2, rep, nb1, nb2, own1, own2):
    """The rep-th problem batch element that reads own batch element (o0, o1, o2) of a broadcast operand.

    Along a merged batch dim the operand either has the full size (the index is its own) or size 1
    (every index of the dim reads it): ``rep`` enumerates the latter dims in C order.
    """
    r = rep
    b2 = o2
    if own2 == 1 and nb2 > 1:
        b2 = r % nb2
        r //= nb2
    b1 = o1
    if own1 == 1 and nb1 > 1:
        b1 = r % nb1
        r //= nb1
    b0 = o0 + r  # own0 == 1 < nb0 leaves r in [0, nb0); else r == 0
    return b0, b1, b2
