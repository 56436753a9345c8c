"""Jagged nested tensors through cusdpa's variable-length path.

A jagged (B, H, j, E) nested tensor transposed to (B, j, H, E) stores its tokens as one packed
(total_tokens, H, E) buffer with int64 offsets: exactly FlashAttention's varlen layout. The packing
and unpacking are torch's own differentiable views, so autograd reaches the caller's nested inputs.
"""
from __future__ import annotations

import torch

from cusdpa.errors import ArgumentError, ArgumentTypeError

from . import arguments, autograd


def attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, causal_variant, window,
              softcap, alibi_slopes, backend):
    """Attention of jagged nested (B, H, j, E) query/key/value; returns a jagged (B, H, j, Ev) tensor."""
    tensors = {"query": query, "key": key, "value": value}
    for name, t in tensors.items():
        if not (isinstance(t, torch.Tensor) and t.is_nested and t.layout == torch.jagged):
            kind = "a torch.strided nested tensor" if isinstance(t, torch.Tensor) and t.is_nested else \
                f"a {type(t).__name__}" if not isinstance(t, torch.Tensor) else "a dense tensor"
            raise ArgumentTypeError(f"{name} is {kind} but query/key/value must all be jagged nested tensors "
                                    "(torch.nested.nested_tensor(..., layout=torch.jagged)) or all dense")
        if t.dim() != 4 or t._ragged_idx != 2:
            raise ArgumentError(f"{name}.shape={tuple(t.shape)} must be (B, H, j, E) with the ragged dim third "
                                "(transpose(1, 2) a (B, j, H, E) nested tensor)")
    if attn_mask is not None:
        raise ArgumentError("attn_mask is not supported with nested inputs: the sequences already have their own "
                            "lengths; use is_causal / window, or pad to a dense batch for an arbitrary mask")
    arguments.check_tensors(tensors, alibi_slopes=alibi_slopes)
    packed = [t.transpose(1, 2) for t in (query, key, value)]  # (B, j, H, E): values() is (total, H, E)
    for name, t in zip(tensors, packed):
        if t.lengths() is not None:
            raise ArgumentError(f"{name} is a nested tensor with holes (lengths() is set); call .contiguous() on it")
    if packed[1].offsets() is not packed[2].offsets() and not torch.equal(packed[1].offsets(), packed[2].offsets()):
        raise ArgumentError("key and value have different sequence lengths; they must share one jagged structure")
    offsets_q, offsets_k = packed[0].offsets(), packed[1].offsets()
    options = arguments.options(dropout_p, is_causal, scale, enable_gqa, causal_variant, window, softcap,
                                arguments.tf32_allowed(query))
    out = autograd.varlen_attention(*arguments.unit_strides(*(t.values() for t in packed)), offsets_q.to(torch.int32),
                                    offsets_k.to(torch.int32), alibi_slopes, _max_seqlen(offsets_q),
                                    _max_seqlen(offsets_k), arguments.draw_seed(dropout_p),
                                    arguments.backend_names(backend), options)[0]
    return torch.nested.nested_tensor_from_jagged(out, offsets_q).transpose(1, 2)


def _max_seqlen(offsets: torch.Tensor) -> int:
    # The kernels size their grids by it; B + 1 integers come to the host (varlen reads them anyway).
    return int((offsets[1:] - offsets[:-1]).max()) if offsets.numel() > 1 else 0
