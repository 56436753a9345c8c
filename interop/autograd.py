"""The one autograd path of the torch bridge: ``torch.autograd.Function``s whose forward and backward are
the custom ops (ops.py), for every call on torch tensors: eager, masked, profiled, under functorch
transforms and in compiled graphs (Dynamo traces the Function; AOTAutograd splits it into the two ops).

``Function.apply`` binds its arguments with ``inspect.signature`` on every call (about 25 us of host time,
more than the op itself); outside functorch transforms and compilation the Function is applied through
the C entry ``apply`` uses after that binding, which sees the same Function (setup_context, saved tensors,
backward) and skips the binding. A call where no input needs a gradient runs the forward op alone, as the
Function's forward would, without building an autograd node (eager and compiled alike: Dynamo cannot
trace a Function in no-grad mode).
"""
from __future__ import annotations

import torch

from . import native, ops

# The C implementation behind Function.apply (torch/autograd/function.py): a classmethod of _FunctionBase.
_C_APPLY = torch._C._FunctionBase.__dict__["apply"]


def _needs_grad(*tensors) -> bool:
    # a loop, not any() over a generator: half the host time of this check, which every call makes
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def _exporting() -> bool:
    """Whether torch.export traces the call: the flag it sets, which Dynamo reads as a module's global.
    ``torch.compiler.is_exporting()`` is no answer: torch 2.11's Dynamo folds it to True in every trace, so
    compiled graphs never held the library's forward there."""
    return getattr(torch.compiler, "_is_exporting_flag", False)


def _apply(function, *args):
    if torch.compiler.is_compiling():
        return function.apply(*_distinct(args))
    if torch._C._are_functorch_transforms_active():
        return function.apply(*args)
    return _C_APPLY.__get__(None, function)(*args)


def _distinct(args: tuple) -> tuple:
    """``args`` with each repeated tensor (self-attention's ``f(x, x, x)``) replaced by a view of itself:
    Dynamo does not trace a Function given one tensor as several inputs, and a view shares the memory and
    carries its gradient back to the tensor."""
    seen: list = []
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            if any(a is s for s in seen):
                a = a.view_as(a)
            seen.append(a)
        out.append(a)
    return tuple(out)


def _first_order(ctx) -> None:
    # Autograd runs a backward in grad mode only for create_graph=True. The ops carry no derivative of their
    # own, so a second-order gradient would silently be zero: refuse it, as once_differentiable would (its
    # wrapper costs a few microseconds on every backward).
    if torch.is_grad_enabled():
        raise RuntimeError("cusdpa attention is differentiable once: its backward cannot be differentiated "
                           "(create_graph=True, double backward)")


class Attention(torch.autograd.Function):
    """Dense attention: ``cusdpa::sdpa_fwd`` forward, ``cusdpa::sdpa_bwd`` backward. Arguments: query, key,
    value, attn_mask, alibi_slopes, seed, backends, and the tuple of option values (``arguments.options``):
    one argument, since autograd handles every argument of apply and of backward's result on every call.
    The slopes get no gradient (nor do they in FlashAttention). ``deterministic``: the backward sums in a
    fixed order even where torch's deterministic mode is off (FlashAttention's ``deterministic=True``)."""

    @staticmethod
    def forward(query, key, value, attn_mask, alibi_slopes, seed, backends, options, deterministic):
        return ops.call(ops.sdpa_fwd, query, key, value, attn_mask, alibi_slopes, *options, seed, backends)

    @staticmethod
    def setup_context(ctx, inputs, output):
        query, key, value, attn_mask, alibi_slopes, seed, ctx.backends, ctx.options, ctx.deterministic = inputs
        ctx.save_for_backward(query, key, value, attn_mask, alibi_slopes, *output, seed)
        ctx.mark_non_differentiable(output[1])  # lse is for the backward only

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        _first_order(ctx)
        query, key, value, attn_mask, alibi_slopes, out, lse, seed = ctx.saved_tensors
        mask_grad = attn_mask is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dmask = ops.call(ops.sdpa_bwd, grad_out, query, key, value, attn_mask, alibi_slopes, out, lse,
                                     *ctx.options, seed, ctx.backends, _deterministic(ctx), mask_grad)
        dmask = dmask if mask_grad else None
        return dq, dk, dv, dmask, None, None, None, None, None


class VarlenAttention(torch.autograd.Function):
    """Packed variable-length attention: ``cusdpa::varlen_fwd`` / ``cusdpa::varlen_bwd``. Arguments: query,
    key, value, cu_seqlens_q, cu_seqlens_k, alibi_slopes, max_seqlen_q, max_seqlen_k, seed, backends, option
    values, deterministic (as Attention's)."""

    @staticmethod
    def forward(query, key, value, cu_seqlens_q, cu_seqlens_k, alibi_slopes, max_seqlen_q, max_seqlen_k, seed,
                backends, options, deterministic):
        return ops.call(ops.varlen_fwd, query, key, value, cu_seqlens_q, cu_seqlens_k, alibi_slopes, max_seqlen_q,
                        max_seqlen_k, *options, seed, backends)

    @staticmethod
    def setup_context(ctx, inputs, output):
        (query, key, value, cu_seqlens_q, cu_seqlens_k, alibi_slopes, max_q, max_k, seed, ctx.backends,
         ctx.options, ctx.deterministic) = inputs
        ctx.save_for_backward(query, key, value, cu_seqlens_q, cu_seqlens_k, alibi_slopes, *output, seed)
        ctx.max_seqlens = (max_q, max_k)
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        _first_order(ctx)
        query, key, value, cu_seqlens_q, cu_seqlens_k, alibi_slopes, out, lse, seed = ctx.saved_tensors
        grads = ops.call(ops.varlen_bwd, grad_out, query, key, value, cu_seqlens_q, cu_seqlens_k, alibi_slopes, out,
                         lse, *ctx.max_seqlens, *ctx.options, seed, ctx.backends, _deterministic(ctx))
        return *grads, *[None] * 9


def _deterministic(ctx) -> bool:
    return ctx.deterministic or torch.are_deterministic_algorithms_enabled()


def attention(query, key, value, attn_mask, alibi_slopes, seed, backends: str, options: tuple,
              deterministic: bool = False):
    """(out, lse) of dense attention, out differentiable in query, key, value and a float attn_mask. Plain eager
    calls on CUDA tensors without slopes or a mask's gradient replay their plans in compiled code where that is
    enabled (``interop.native``)."""
    need_grad = _needs_grad(query, key, value, attn_mask)
    if native.ENABLED and alibi_slopes is None and query.is_cuda and not (attn_mask is not None
                                                                          and attn_mask.requires_grad):
        got = native.attention(query, key, value, attn_mask, seed, backends, options, deterministic, need_grad)
        if got is not None:
            return got
    if not need_grad:
        if (torch.compiler.is_compiling() and not _exporting() and attn_mask is None and alibi_slopes is None
                and seed is None and query.is_cuda
                and type(query) is torch.Tensor and type(key) is torch.Tensor and type(value) is torch.Tensor):
            # a compiled graph's call on plain tensors (a subclass's dispatch stays the ops'): the library's op,
            # which replays the call's plan without Python (not in an exported program: its kind means something
            # only to the process that traced it)
            kind = native.graph_kind(options, backends)
            if kind >= 0:
                return torch.ops.cusdpa_native.graph_forward(query, key, value, kind)
        return ops.call(ops.sdpa_fwd, query, key, value, attn_mask, alibi_slopes, *options, seed, backends)
    return _apply(Attention, query, key, value, attn_mask, alibi_slopes, seed, backends, options, deterministic)


def varlen_attention(query, key, value, cu_seqlens_q, cu_seqlens_k, alibi_slopes, max_seqlen_q, max_seqlen_k, seed,
                     backends: str, options: tuple, deterministic: bool = False):
    """(out, lse) of variable-length attention in the packed layout, out differentiable in query, key and
    value."""
    if not _needs_grad(query, key, value):
        return ops.call(ops.varlen_fwd, query, key, value, cu_seqlens_q, cu_seqlens_k, alibi_slopes, max_seqlen_q,
                        max_seqlen_k, *options, seed, backends)
    return _apply(VarlenAttention, query, key, value, cu_seqlens_q, cu_seqlens_k, alibi_slopes, max_seqlen_q,
                  max_seqlen_k, seed, backends, options, deterministic)
