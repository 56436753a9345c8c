"""Eager fast path: a repeated dense call on CUDA tensors replays the launches its first call prepared.

The custom ops (ops.py) validate the arguments, dispatch and build CuPy views on every call: about
250 us of host time on the H200 machine, for an attention whose kernel may take 40 us. In eager mode a
call whose signature (shapes, strides, dtype, device, 16-byte alignment and every option) was seen
before skips all of that: the first call builds a ``flash.Plan`` through the same validation and
dispatch, and later calls allocate the outputs with torch and launch the same kernels, with the same
arguments, on raw pointers on torch's current stream. A ``torch.autograd.Function`` (lighter than the
custom op's autograd wrapper) runs the plan's backward. Dropout seeds are drawn exactly as the ops draw
them, so ``torch.manual_seed`` gives the same keep-mask on either path.

Calls the plan does not cover take the ops: torch.compile tracing, a profiler (the ops name themselves
in its tables), functorch transforms, tensor subclasses, masks, inputs FLASH does not take or would
have to copy.
"""
from __future__ import annotations

import threading

import torch

from cusdpa import checks, flash
from cusdpa.dispatch import Backend

from . import bridge, ops

MAX_PLANS = 1024  # distinct signatures kept; past that the cache starts over
_plans: dict = {}  # signature -> flash.Plan, or None: that signature takes the ops
_lock = threading.Lock()


def applies(query, key, value, attn_mask) -> bool:
    """Whether this call may use a plan at all (the signature decides whether one exists)."""
    # is_compiling first: while Dynamo traces, it folds to True and nothing after it is traced
    return (not torch.compiler.is_compiling() and attn_mask is None and type(query) is torch.Tensor
            and type(key) is torch.Tensor and type(value) is torch.Tensor and query.is_cuda
            and not torch.autograd.profiler._is_profiler_enabled
            and not torch._C._are_functorch_transforms_active())


def attention(query, key, value, options: tuple):
    """``out``, or None when this signature takes the ops. ``options`` as ``functional.options`` returns
    them (dropout_p, is_causal, scale, enable_gqa, causal_variant, window, seed, backends)."""
    dropout_p, is_causal, scale, enable_gqa, causal_variant, window, seed, backends = options
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    aligned = (query.data_ptr() | key.data_ptr() | value.data_ptr()) % 16 == 0
    signature = (query.shape, query.stride(), key.shape, key.stride(), value.shape, value.stride(), query.dtype,
                 query.device, aligned, needs_grad, dropout_p, is_causal, scale, enable_gqa, causal_variant,
                 None if window is None else tuple(window), backends)
    plan = _plans.get(signature, False)
    if plan is False:
        plan = _build(query, key, value, options, needs_grad)
        with _lock:
            if len(_plans) >= MAX_PLANS:
                _plans.clear()
            _plans[signature] = plan
    if plan is None:
        return None
    return _Attention.apply(query, key, value, plan, ops._seed(seed, dropout_p))


def _build(query, key, value, options, needs_grad):
    """The plan of this signature through the ops' own validation and dispatch; None unless FLASH runs it."""
    dropout_p, is_causal, scale, enable_gqa, causal_variant, window, _, backends = options
    with bridge.on_stream(query.device):
        pr = checks.problem_from_dense(*(bridge.as_array(t) for t in (query, key, value)), None, dropout_p,
                                       is_causal, scale, enable_gqa, causal_variant,
                                       None if window is None else tuple(window), 0)
        if ops._select(pr, backends, need_grad=needs_grad).backend is not Backend.FLASH:
            return None
        return flash.plan(pr, backward=needs_grad)


def _launch(launches, device, values):
    import cupy

    with cupy.cuda.Device(device.index):
        stream = torch.cuda.current_stream(device).cuda_stream
        for launch in launches:
            launch(values, stream)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, plan, seed):
        out = torch.empty(plan.out_shape, dtype=query.dtype, device=query.device)
        lse = torch.empty(plan.lse_shape, dtype=torch.float32, device=query.device)
        if plan.forward is not None:
            _launch((plan.forward,), query.device, dict(q=query.data_ptr(), k=key.data_ptr(), v=value.data_ptr(),
                                                        o=out.data_ptr(), lse=lse.data_ptr(),
                                                        **flash.seed_values(seed)))
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.plan, ctx.seed = plan, seed
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        query, key, value, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grads = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (query, key, value)]
        delta = torch.empty_like(lse)
        _launch(ctx.plan.backward, query.device,
                dict(q=query.data_ptr(), k=key.data_ptr(), v=value.data_ptr(), o=out.data_ptr(),
                     do=grad_out.data_ptr(), lse=lse.data_ptr(), delta=delta.data_ptr(), dq=grads[0].data_ptr(),
                     dk=grads[1].data_ptr(), dv=grads[2].data_ptr(), **flash.seed_values(ctx.seed)))
        return (*grads, None, None)
