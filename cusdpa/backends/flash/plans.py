"""Plans: every FLASH launch of one dense call signature, prepared by its first call and replayed by the
calls that repeat it, for the torch bridge (its custom ops) and for CuPy callers alike.

Validating the arguments, dispatching and building CuPy views cost about 250 us of host time per call
on the H200 machine, for an attention whose kernel may take 40 us. A signature (shapes, strides, dtypes,
devices, 16-byte alignment of each base, every option and the enabled backends) fully decides all of
that, so a call whose signature was seen before only allocates its outputs and launches the same kernels,
with the same arguments, on raw pointers. The first call of a signature builds the plan from a
validated Problem; a signature FLASH does not run, or could run only on copies of its inputs, caches
None and takes the general path.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from ..launch import run
from . import launches

MAX_PLANS = 1024  # distinct signatures kept; past that the cache starts over
_plans: dict = {}  # signature -> Plan, or None: that signature takes the general path
_lock = threading.Lock()
_MISS = object()


def token_major_strides(shape) -> tuple:
    """Element strides of a dense output (..., Hq, L, Ev) laid out (..., L, Hq, Ev) in memory, as PyTorch's
    fused SDPA kernels lay theirs out: merging the heads back into features (``transpose(-3, -2)`` then
    ``reshape``) is then a view instead of a copy. Rank 2 (L, Ev) is row-major. Works on symbolic sizes."""
    if len(shape) < 3:
        return tuple(shape[1:]) + (1,)
    hq, L, ev = shape[-3:]
    strides = [ev, hq * ev, 1]
    inner = L * hq * ev
    for n in reversed(shape[:-3]):
        strides.insert(0, inner)
        inner = inner * n
    return tuple(strides)


def contiguous_strides(shape) -> tuple:
    strides, inner = [], 1
    for n in reversed(shape):
        strides.insert(0, inner)
        inner *= n
    return tuple(strides)


@dataclass(frozen=True)
class Plan:
    """Every launch of one problem signature. Operands are read in place and results written to buffers
    the caller allocates: out (``out_shape``, ``out_strides`` in elements), lse (``lse_shape``, float32) and
    delta like it, dq, dk, dv contiguous in the shapes of q, k and v, and a workspace dq_accum of
    ``dq_accum_elements`` 4-byte elements where that is not 0 (the kernels zero it); dout is read in the
    layout the plan was built for. Arguments are raw device pointers (ints); launches go on ``stream`` on
    ``device``."""

    device: int
    out_shape: tuple
    out_strides: tuple
    lse_shape: tuple
    forward: tuple
    backward: tuple
    copies_dout: bool = False  # dout is read in out's layout: the caller copies it there first
    dq_accum_elements: int = 0  # the backward's workspace
    # with an attn_mask (read in place, its address passed per call): the launches of its summary, which
    # write buffers of seen_bytes and blocks_bytes that forward and backward read; the caller runs them
    # first, or reuses the buffers of an earlier run while the mask is unchanged (the same summary_key:
    # the same tiles, hence the same buffers, for the forward and the backward plan of a signature)
    summary: tuple = ()
    summary_key: object = None
    seen_bytes: int = 0
    blocks_bytes: int = 0

    def run_summary(self, stream: int, mask: int, seen: int, blocks: int) -> None:
        run(self.summary, (None,) * 14 + (mask, seen, blocks), stream, self.device)

    def run_forward(self, stream: int, q: int, k: int, v: int, o: int, lse: int, seed: int, mask: int = 0,
                    seen: int = 0, blocks: int = 0) -> None:
        if self.forward:  # the value tuple in launch.SLOTS order
            run(self.forward, (q, k, v, o, lse, None, None, None, None, None, seed & 0xFFFFFFFF, seed >> 32, 0, None,
                               mask, seen, blocks), stream, self.device)

    def run_backward(self, stream: int, q: int, k: int, v: int, o: int, do: int, lse: int, delta: int, dq: int,
                     dk: int, dv: int, seed: int, dq_accum: int = 0, mask: int = 0, seen: int = 0,
                     blocks: int = 0) -> None:
        run(self.backward, (q, k, v, o, lse, do, delta, dq, dk, dv, seed & 0xFFFFFFFF, seed >> 32, 0, dq_accum,
                            mask, seen, blocks), stream, self.device)


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
                tuple(launches.forward_launches(pr, lay, strides["o"], mask_strides)), backward_launches,
                copies_dout=backward and dout_strides is None,
                dq_accum_elements=launches.dq_accum_elements(pr, deterministic) if backward else 0,
                summary=summary, summary_key=summary_key, seen_bytes=seen_bytes, blocks_bytes=blocks_bytes)


def lookup(signature: tuple, make) -> Plan | None:
    """The plan cached for ``signature``; on a miss ``make()`` builds it (validating the call as the general
    path would, and raising what it raises) or returns None for calls that take the general path."""
    plan = _plans.get(signature, _MISS)
    if plan is _MISS:
        plan = make()
        with _lock:
            if len(_plans) >= MAX_PLANS:
                _plans.clear()
            _plans[signature] = plan
    return plan
