"""Eager fast path: a repeated dense call on CUDA tensors replays its prepared launches (plans.py)
through a ``torch.autograd.Function``, without the custom op's dispatcher and autograd wrapper.

Dropout seeds are drawn exactly as the ops draw them, so ``torch.manual_seed`` gives the same
keep-mask on either path. Calls this path does not cover take the ops, which replay the same plans
when they can: torch.compile tracing, a profiler (the ops name themselves in its tables), functorch
transforms, tensor subclasses, masks, and signatures without a plan.
"""
from __future__ import annotations

import torch

from . import plans


def applies(query, key, value, attn_mask) -> bool:
    """Whether this call may skip the ops at all (the signature then decides whether a plan exists)."""
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
    plan = plans.lookup(query, key, value, dropout_p, is_causal, scale, enable_gqa, causal_variant, window,
                        backends, backward=needs_grad)
    if plan is None:
        return None
    if not needs_grad:  # inference: no autograd node to build
        return plans.forward(plan, query, key, value, plans.seed_of(seed, dropout_p))[0]
    return _Attention.apply(query, key, value, plan, plans.seed_of(seed, dropout_p))


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, plan, seed):
        out, lse = plans.forward(plan, query, key, value, seed)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.plan, ctx.seed = plan, seed
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        query, key, value, out, lse = ctx.saved_tensors
        return (*plans.backward(ctx.plan, grad_out, query, key, value, out, lse, ctx.seed), None, None)
