"""FLASH's plans (cusdpa.backends.plans): the launches of one dense call signature, built from a validated
Problem by the general path's own launch builders with the operands' addresses left as slots."""
from __future__ import annotations

import numpy as np

from ..plans import Plan
from . import launches


def build(pr, out_strides: tuple, backward: bool, dout_strides: tuple | None = None,
          deterministic: bool = False) -> Plan | None:
    """The Plan of a validated dense problem whose q, k, v (and attn_mask) the kernels read in place with every
    batch dim present (no broadcast to sum gradients over), its output laid out with ``out_strides`` and the
    backward's dout with ``dout_strides`` (default: as out); None for anything else. Without ``backward``
    the backward kernels are neither compiled nor planned; ``deterministic`` backward kernels sum in a
    fixed order."""
    if pr.varlen is not None or pr.offset or pr.alibi_slopes is not None:  # (the slopes are no slot)
        return None
    mask_strides, summary, summary_key, seen_bytes, blocks_bytes = None, (), None, 0, 0
    if pr.mask is not None:  # read in place (its address is the caller's per call), or no plan
        operand, mask_strides = launches.mask_operand(pr)
        if operand.data.ptr != pr.mask.data.ptr:
            return None
        shape, skip = launches.mask_summary(pr, mask_strides), launches.config(pr).fwd90_mask_blocks
        summary, summary_key = tuple(shape.launches(pr, skip)), (shape, skip)
        seen_bytes, blocks_bytes = shape.seen_bytes, shape.blocks_bytes(pr.S)
    q, k, v = pr.q, pr.k, pr.v
    if not (q.ndim == k.ndim == v.ndim >= 3 and q.shape[:-3] == k.shape[:-3] == v.shape[:-3] == pr.batch_shape):
        return None
    if not all(launches.usable(x) for x in (q, k, v)):
        return None
    lay = launches.layout(pr)
    if any(a.data.ptr != x.data.ptr for a, x in ((lay.q, q), (lay.k, k), (lay.v, v))):  # copied: no in-place read
        return None

    def contiguous(heads, rows, dim):
        return [np.int64(heads * rows * dim), np.int64(rows * dim), np.int64(dim)]

    nb = len(pr.batch_shape)
    o = launches.kernel_strides(pr.out_shape, out_strides, nb, pr.dtype.itemsize)
    do = o if dout_strides is None else launches.kernel_strides(pr.out_shape, dout_strides, nb, pr.dtype.itemsize)
    if o is None or do is None:
        return None
    strides = {"o": o, "do": do, "dq": contiguous(pr.hq, pr.L, pr.E), "dk": contiguous(pr.hkv, pr.S, pr.E),
               "dv": contiguous(pr.hkv, pr.S, pr.Ev)}
    backward_launches = tuple(launches.backward_launches(pr, lay, strides, deterministic, mask_strides)) \
        if backward else ()
    return Plan(launches.device(pr), pr.out_shape, tuple(out_strides), pr.lse_shape,
                tuple(launches.forward_launches(pr, lay, strides["o"], mask_strides)), backward_launches, "flash",
                copies_dout=backward and dout_strides is None,
                dq_accum_elements=launches.dq_accum_elements(pr, deterministic) if backward else 0,
                summary=summary, summary_key=summary_key, seen_bytes=seen_bytes, blocks_bytes=blocks_bytes)
