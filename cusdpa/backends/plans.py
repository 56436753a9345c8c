"""Plans: every launch of one dense call signature, prepared by its first call and replayed by the calls
that repeat it, for the torch bridge (its custom ops) and for CuPy callers alike, whichever of FLASH and
EFFICIENT runs the call.

Validating the arguments, dispatching and building CuPy views cost about 250 us of host time per call
on the H200 machine (EFFICIENT's Numba launches about 550 us), for an attention whose kernel may take
40 us. A signature (shapes, strides, dtypes, devices, 16-byte alignment of each base, every option, the
enabled backends and the kernel configuration) fully decides all of that, so a call whose signature was
seen before only allocates its outputs and launches the same kernels, with the same arguments, on raw
pointers. The first call of a signature builds the plan from a validated Problem (``build``: FLASH's in
backends/flash/plans.py, EFFICIENT's in backends/efficient.py); a signature neither runs, or runs only on
copies of its inputs, caches None and takes the general path.
"""
from __future__ import annotations

import dataclasses
import functools
import threading
from dataclasses import dataclass

from ..dispatch import Backend
from .launch import run

MAX_PLANS = 1024  # distinct signatures kept; past that the cache starts over
_plans: dict = {}  # signature -> Plan, or None: that signature takes the general path
_lock = threading.Lock()
_MISS = object()
NOT_YET = object()  # make(): not this call, try a later one
TRIES = 3
_tries: dict = {}  # signature -> NOT_YETs so far


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
    backend: str  # the Backend value whose kernels these are (a profiler range names it)
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
    grad_shapes: tuple = ()  # dq's, dk's and dv's shapes (q's, k's and v's), where the plan has a backward

    @functools.cached_property
    def lse_strides(self) -> tuple:
        """lse's (and delta's) element strides: contiguous (``torch.Tensor.new_empty_strided`` allocates
        in fewer microseconds than ``new_empty``)."""
        return contiguous_strides(self.lse_shape)

    @functools.cached_property
    def grad_strides(self) -> tuple:
        """dq's, dk's and dv's element strides: contiguous."""
        return tuple(contiguous_strides(shape) for shape in self.grad_shapes)

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


def lookup(signature: tuple, make) -> Plan | None:
    """The plan cached for ``signature``; on a miss ``make()`` builds it (validating the call as the general
    path would, and raising what it raises) or returns None for calls that take the general path, or
    NOT_YET: this call takes the general path and a later one tries again (EFFICIENT records its launches
    once the general path has prepared them), at most ``TRIES`` times before None is kept."""
    plan = _plans.get(signature, _MISS)
    if plan is _MISS:
        plan = make()
        with _lock:
            if plan is NOT_YET:
                tries = _tries[signature] = _tries.get(signature, 0) + 1
                if tries < TRIES:
                    return None
                del _tries[signature]
                plan = None
            if len(_plans) >= MAX_PLANS:
                _plans.clear()
                _tries.clear()
            _plans[signature] = plan
    return plan


def build(pr, backend: Backend, out_strides: tuple, backward: bool, dout_strides: tuple | None = None,
          deterministic: bool = False, addresses: dict | None = None):
    """The Plan of a validated dense problem that ``backend`` runs, its output laid out with ``out_strides``
    and the backward's dout with ``dout_strides`` (default: as out); None where that backend has no plan for
    it. ``addresses``: the caller's q, k, v and mask base addresses (what a replay passes), which the
    problem must read in place."""
    if backend is Backend.FLASH:
        from .flash import plans

        plan = plans.build(pr, out_strides, backward, dout_strides, deterministic)
    elif backend is Backend.EFFICIENT:
        from . import efficient

        plan = efficient.plan(pr, out_strides, backward, dout_strides, addresses, deterministic)
    else:
        return None
    if backward and isinstance(plan, Plan):
        plan = dataclasses.replace(plan, grad_shapes=(tuple(pr.q.shape), tuple(pr.k.shape), tuple(pr.v.shape)))
    return plan
