"""torch.library custom ops: dense and variable-length attention, forward and backward.

The ops are functional: nothing is mutated and no global state decides a result (the plan cache only
remembers how a signature was launched). The dropout seed and the backends to try are inputs, so
eager mode, a torch.compile graph and a backward that runs on autograd's own thread all see the same
keep-mask and the same dispatch. Outputs are allocated by torch (its caching allocator owns them) and
filled in place by the backend through array views. A dense call on CUDA tensors whose signature
FLASH ran before replays that call's prepared launches (plans.py), in eager mode and in compiled
graphs alike.

In torch.profiler tables each call shows as the op (``cusdpa::sdpa_fwd``, ``cusdpa::varlen_bwd``,
...) with the backend that ran nested inside it (``cusdpa::flash_fwd``, ``cusdpa::math_bwd``, ...).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from cusdpa import checks

from . import bridge, plans

Tensor = torch.Tensor


def dense_out_shape(query: Tensor, key: Tensor, value: Tensor) -> tuple:
    """Output shape (..., Hq, L, Ev) of dense attention, symbolic sizes included (for the fake ops)."""
    rank = max(query.dim(), key.dim(), value.dim())
    batch = torch.broadcast_shapes(*(x.shape[:-3] for x in (query, key, value)))
    hq = query.shape[-3] if query.dim() >= 3 else 1  # rank-2 inputs have one head
    shape = (*batch, hq, query.shape[-2], value.shape[-1])
    return shape[len(shape) - rank:]


def _window(window: Optional[list[int]]):
    return None if window is None else tuple(window)


def _profiled(name: str):
    # record_function costs ~15 us per call even with no profiler running: only pay it when one is.
    if torch.autograd.profiler._is_profiler_enabled:
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()


def _arrays(*tensors):
    return [None if t is None else bridge.as_array(t) for t in tensors]


def _forward(pr: checks.Problem, like: Tensor, backends: str) -> tuple[Tensor, Tensor]:
    impl = plans.select(pr, backends, need_grad=False)
    out = like.new_empty(pr.out_shape) if pr.varlen is not None else \
        like.new_empty_strided(pr.out_shape, checks.token_major_strides(pr.out_shape))
    lse = like.new_empty(pr.lse_shape, dtype=torch.float32)
    with _profiled(f"cusdpa::{impl.backend.value}_fwd"):
        impl.forward(pr, *_arrays(out, lse))
    return out, lse


def _backward(pr: checks.Problem, grads: list[Tensor], grad_out: Tensor, out: Tensor, lse: Tensor, backends: str,
              deterministic: bool) -> None:
    impl = plans.select(pr, backends, need_grad=True)
    with _profiled(f"cusdpa::{impl.backend.value}_bwd"):
        impl.backward(pr, *_arrays(out, lse, grad_out), deterministic, tuple(_arrays(*grads)))


def _plan(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, causal_variant, window, backends,
          backward):
    """The prepared launches of a dense call (plans.py), or None: validate and dispatch in full."""
    if attn_mask is not None or not query.is_cuda:
        return None
    return plans.lookup(query, key, value, dropout_p, is_causal, scale, enable_gqa, causal_variant, window,
                        backends, backward)


# ---- dense ------------------------------------------------------------------------------------

@torch.library.custom_op("cusdpa::sdpa_fwd", mutates_args=())
def sdpa_fwd(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], dropout_p: float,
             is_causal: bool, scale: Optional[float], enable_gqa: bool, causal_variant: str,
             window: Optional[list[int]], seed: Optional[Tensor], backends: str) -> tuple[Tensor, Tensor]:
    """(out, lse) of dense attention; out is laid out token-major (``checks.token_major_strides``), as
    PyTorch's fused kernels lay out theirs. ``seed``: int64 CPU tensor (1,) or None without dropout;
    ``backends``: comma-separated cusdpa.Backend values, tried in that order."""
    plan = _plan(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, causal_variant, window,
                 backends, backward=False)
    if plan is not None:
        with _profiled("cusdpa::flash_fwd"):
            return plans.forward(plan, query, key, value, plans.seed_of(seed, dropout_p))
    with bridge.on_stream(query.device):
        pr = checks.problem_from_dense(*_arrays(query, key, value, attn_mask), dropout_p, is_causal, scale,
                                       enable_gqa, causal_variant, _window(window), plans.seed_of(seed, dropout_p))
        return _forward(pr, query, backends)


@sdpa_fwd.register_fake
def _(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, causal_variant, window, seed, backends):
    shape = dense_out_shape(query, key, value)
    return (query.new_empty_strided(shape, checks.token_major_strides(shape)),
            query.new_empty(shape[:-1], dtype=torch.float32))


def _float_mask(attn_mask: Optional[Tensor]) -> bool:
    return attn_mask is not None and attn_mask.dtype.is_floating_point


@torch.library.custom_op("cusdpa::sdpa_bwd", mutates_args=())
def sdpa_bwd(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], out: Tensor,
             lse: Tensor, dropout_p: float, is_causal: bool, scale: Optional[float], enable_gqa: bool,
             causal_variant: str, window: Optional[list[int]], seed: Optional[Tensor], backends: str,
             deterministic: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dmask); dmask has attn_mask's shape for a float mask and 0 elements otherwise
    (an op cannot return None)."""
    plan = _plan(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, causal_variant, window,
                 backends, backward=True)
    if plan is not None and plans.backward_takes(plan, query, grad_out, out, lse):
        with _profiled("cusdpa::flash_bwd"):
            dq, dk, dv = plans.backward(plan, grad_out, query, key, value, out, lse, plans.seed_of(seed, dropout_p))
        return dq, dk, dv, query.new_empty(0)
    grad_out = grad_out.contiguous()
    with bridge.on_stream(query.device):
        pr = checks.problem_from_dense(*_arrays(query, key, value, attn_mask), dropout_p, is_causal, scale,
                                       enable_gqa, causal_variant, _window(window), plans.seed_of(seed, dropout_p))
        grads = [query.new_empty(x.shape) for x in (query, key, value)]
        dmask = attn_mask.new_empty(attn_mask.shape) if _float_mask(attn_mask) else query.new_empty(0)
        _backward(pr, grads + [dmask] if _float_mask(attn_mask) else grads, grad_out, out, lse, backends,
                  deterministic)
    return (*grads, dmask)


@sdpa_bwd.register_fake
def _(grad_out, query, key, value, attn_mask, *options):
    dmask = attn_mask.new_empty(attn_mask.shape) if _float_mask(attn_mask) else query.new_empty(0)
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape), dmask


def _sdpa_setup_context(ctx, inputs, output):
    (query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, causal_variant, window, seed,
     backends) = inputs
    ctx.save_for_backward(query, key, value, attn_mask, *output, seed)
    ctx.options = (dropout_p, is_causal, scale, enable_gqa, causal_variant, window, backends)
    ctx.mark_non_differentiable(output[1])  # lse is for the backward only


def _sdpa_backward(ctx, grad_out, _grad_lse):
    query, key, value, attn_mask, out, lse, seed = ctx.saved_tensors
    dropout_p, is_causal, scale, enable_gqa, causal_variant, window, backends = ctx.options
    dq, dk, dv, dmask = sdpa_bwd(grad_out, query, key, value, attn_mask, out, lse, dropout_p,
                                 is_causal, scale, enable_gqa, causal_variant, window, seed, backends,
                                 torch.are_deterministic_algorithms_enabled())
    return dq, dk, dv, dmask if ctx.needs_input_grad[3] else None, *[None] * 8


sdpa_fwd.register_autograd(_sdpa_backward, setup_context=_sdpa_setup_context)


# ---- variable length (packed) -----------------------------------------------------------------

@torch.library.custom_op("cusdpa::varlen_fwd", mutates_args=())
def varlen_fwd(query: Tensor, key: Tensor, value: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
               max_seqlen_q: int, max_seqlen_k: int, dropout_p: float, is_causal: bool, scale: Optional[float],
               enable_gqa: bool, causal_variant: str, window: Optional[list[int]], seed: Optional[Tensor],
               backends: str) -> tuple[Tensor, Tensor]:
    """(out (Tq, Hq, Ev), lse (Hq, Tq)) of packed variable-length attention (cusdpa.varlen_attention)."""
    with bridge.on_stream(query.device):
        pr = checks.problem_from_varlen(*_arrays(query, key, value, cu_seqlens_q, cu_seqlens_k), max_seqlen_q,
                                        max_seqlen_k, dropout_p, is_causal, scale, enable_gqa, causal_variant,
                                        _window(window), plans.seed_of(seed, dropout_p))
        return _forward(pr, query, backends)


@varlen_fwd.register_fake
def _(query, key, value, *options):
    return (query.new_empty((*query.shape[:2], value.shape[-1])),
            query.new_empty((query.shape[1], query.shape[0]), dtype=torch.float32))


@torch.library.custom_op("cusdpa::varlen_bwd", mutates_args=())
def varlen_bwd(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, cu_seqlens_q: Tensor,
               cu_seqlens_k: Tensor, out: Tensor, lse: Tensor, max_seqlen_q: int, max_seqlen_k: int,
               dropout_p: float, is_causal: bool, scale: Optional[float], enable_gqa: bool, causal_variant: str,
               window: Optional[list[int]], seed: Optional[Tensor], backends: str,
               deterministic: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) in the packed layout."""
    with bridge.on_stream(query.device):
        pr = checks.problem_from_varlen(*_arrays(query, key, value, cu_seqlens_q, cu_seqlens_k), max_seqlen_q,
                                        max_seqlen_k, dropout_p, is_causal, scale, enable_gqa, causal_variant,
                                        _window(window), plans.seed_of(seed, dropout_p))
        grads = [query.new_empty(x.shape) for x in (query, key, value)]
        _backward(pr, grads, grad_out, out, lse, backends, deterministic)
    return tuple(grads)


@varlen_bwd.register_fake
def _(grad_out, query, key, value, *options):
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)


def _varlen_setup_context(ctx, inputs, output):
    (query, key, value, cu_seqlens_q, cu_seqlens_k, max_q, max_k, dropout_p, is_causal, scale, enable_gqa,
     causal_variant, window, seed, backends) = inputs
    ctx.save_for_backward(query, key, value, cu_seqlens_q, cu_seqlens_k, *output, seed)
    ctx.options = (max_q, max_k, dropout_p, is_causal, scale, enable_gqa, causal_variant, window, backends)
    ctx.mark_non_differentiable(output[1])


def _varlen_backward(ctx, grad_out, _grad_lse):
    query, key, value, cu_seqlens_q, cu_seqlens_k, out, lse, seed = ctx.saved_tensors
    max_q, max_k, dropout_p, is_causal, scale, enable_gqa, causal_variant, window, backends = ctx.options
    grads = varlen_bwd(grad_out.contiguous(), query, key, value, cu_seqlens_q, cu_seqlens_k, out, lse, max_q,
                       max_k, dropout_p, is_causal, scale, enable_gqa, causal_variant, window, seed, backends,
                       torch.are_deterministic_algorithms_enabled())
    return *grads, *[None] * 12


varlen_fwd.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)
