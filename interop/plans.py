"""Prepared FLASH launches for repeated dense calls, shared by the custom ops and the eager fast path.

Validating the arguments, dispatching and building CuPy views cost about 250 us of host time per call
on the H200 machine, for an attention whose kernel may take 40 us. A dense call on CUDA tensors whose
signature (shapes, strides, dtypes, devices, 16-byte alignment and every option) was seen before skips
all of that: its first call built a ``flash.Plan`` through the same validation and dispatch, and later
calls allocate the outputs with torch and launch the same kernels, with the same arguments, on raw
pointers on torch's current stream. A signature FLASH does not run, or could run only on copies of its
inputs, caches None and takes the general path.

The custom ops (ops.py) look plans up inside their CUDA implementation, so compiled graphs replay them
too; the eager fast path (fastpath.py) also skips the custom op's own dispatch.
"""
from __future__ import annotations

import threading
from typing import Optional

import torch

from cusdpa import checks, dispatch, flash
from cusdpa.dispatch import Backend

from . import bridge

MAX_PLANS = 1024  # distinct signatures kept; past that the cache starts over
_plans: dict = {}  # signature -> flash.Plan, or None: that signature takes the general path
_lock = threading.Lock()


def seed_of(seed: Optional[torch.Tensor], dropout_p: float) -> int:
    """The dropout seed the ops take (an int64 CPU tensor, or None without dropout) as an int."""
    if seed is None:
        if dropout_p > 0:
            raise ValueError(f"dropout_p={dropout_p} needs a seed tensor: the op draws no randomness itself")
        return 0
    # An int64 CPU tensor: reading it never waits on a GPU.
    return int(seed.item()) & (2**64 - 1)


def select(pr: checks.Problem, backends: str, need_grad: bool) -> dispatch.Implementation:
    """The backend that runs ``pr`` among ``backends`` (comma-separated Backend values, in priority order)."""
    with dispatch.sdpa_kernel([Backend(name) for name in backends.split(",")], set_priority=True):
        return dispatch.select(pr, need_grad)


def lookup(query, key, value, dropout_p: float, is_causal: bool, scale, enable_gqa: bool, causal_variant: str,
           window, backends: str, backward: bool) -> flash.Plan | None:
    """The plan of this dense call (with its backward when ``backward``), or None: take the general path.
    The first call of a signature validates it as the general path would, and raises what it raises."""
    aligned = (query.data_ptr() | key.data_ptr() | value.data_ptr()) % 16 == 0
    window = None if window is None else tuple(window)
    signature = (query.shape, query.stride(), key.shape, key.stride(), value.shape, value.stride(), query.dtype,
                 key.dtype, value.dtype, query.device, key.device, value.device, aligned, backward, dropout_p,
                 is_causal, scale, enable_gqa, causal_variant, window, backends)
    plan = _plans.get(signature, False)
    if plan is False:
        with bridge.on_stream(query.device):
            pr = checks.problem_from_dense(*(bridge.as_array(t) for t in (query, key, value)), None, dropout_p,
                                           is_causal, scale, enable_gqa, causal_variant, window, 0)
            chosen = select(pr, backends, need_grad=backward).backend
            plan = flash.plan(pr, backward=backward) if chosen is Backend.FLASH else None
        with _lock:
            if len(_plans) >= MAX_PLANS:
                _plans.clear()
            _plans[signature] = plan
    return plan


def _launch(launches, device: torch.device, values: dict) -> None:
    import cupy

    with cupy.cuda.Device(device.index):
        # torch's current stream there as a raw handle: what inductor's generated code reads, one C call
        # where torch.cuda.current_stream builds a Stream object
        stream = torch._C._cuda_getCurrentRawStream(device.index)
        for launch in launches:
            launch(values, stream)


def forward(plan: flash.Plan, query, key, value, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of the planned call, in fresh tensors: out in ``plan.out_strides``, lse contiguous."""
    out = torch.empty_strided(plan.out_shape, plan.out_strides, dtype=query.dtype, device=query.device)
    lse = torch.empty(plan.lse_shape, dtype=torch.float32, device=query.device)
    if plan.forward is not None:
        _launch((plan.forward,), query.device, dict(q=query.data_ptr(), k=key.data_ptr(), v=value.data_ptr(),
                                                    o=out.data_ptr(), lse=lse.data_ptr(), **flash.seed_values(seed)))
    return out, lse


def _laid_out(x: torch.Tensor, strides: tuple) -> bool:
    """Whether ``x`` has these strides (where they matter: dims longer than 1) and a 16-byte aligned base."""
    return (x.data_ptr() % 16 == 0
            and all(n == 1 or have == want for n, have, want in zip(x.shape, x.stride(), strides)))


def backward_takes(plan: flash.Plan, query, grad_out, out, lse) -> bool:
    """Whether the plan's backward runs on these ``out``, ``lse`` and ``grad_out``: the forward's own
    outputs always qualify; a caller of the backward op may pass others, which take the general path."""
    return (tuple(out.shape) == tuple(grad_out.shape) == plan.out_shape and tuple(lse.shape) == plan.lse_shape
            and out.dtype == grad_out.dtype == query.dtype and lse.dtype == torch.float32
            and out.device == grad_out.device == lse.device == query.device
            and _laid_out(out, plan.out_strides) and lse.is_contiguous() and lse.data_ptr() % 16 == 0)


def backward(plan: flash.Plan, grad_out, query, key, value, out, lse, seed: int) -> list[torch.Tensor]:
    """[dq, dk, dv] of the planned call (``backward_takes`` must hold)."""
    if not _laid_out(grad_out, plan.out_strides):
        # Merging heads into features makes grad_out token-major already; anything else is copied.
        grad_out = torch.empty_strided(plan.out_shape, plan.out_strides, dtype=grad_out.dtype,
                                       device=grad_out.device).copy_(grad_out)
    grads = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (query, key, value)]
    delta = torch.empty_like(lse)
    _launch(plan.backward, query.device,
            dict(q=query.data_ptr(), k=key.data_ptr(), v=value.data_ptr(), o=out.data_ptr(), do=grad_out.data_ptr(),
                 lse=lse.data_ptr(), delta=delta.data_ptr(), dq=grads[0].data_ptr(), dk=grads[1].data_ptr(),
                 dv=grads[2].data_ptr(), **flash.seed_values(seed)))
    return grads
