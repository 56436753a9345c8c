"""``scaled_dot_product_attention`` and ``varlen_attention`` on torch tensors: PyTorch's signature plus
cusdpa's extras, and FlashAttention's packed layout."""
from __future__ import annotations

import torch
from torch.nn.attention.bias import CausalBias

from cusdpa.problem import check_flag

from . import arguments, autograd, nested


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, causal_variant="upper_left", window=None, softcap=0.0,
                                 alibi_slopes=None, return_lse=False, deterministic=False, backend=None):
    """softmax(scale * query @ key^T + mask) @ value on torch tensors, with autograd; torch.compile-able.

    Shapes: query (..., Hq, L, E), key (..., Hkv, S, E), value (..., Hkv, S, Ev) -> (..., Hq, L, Ev)
    of the input dtype; every dim but the last two broadcasts, heads and ranks included, as in PyTorch;
    E or Ev may be 0. Under ``torch.autocast`` the floating inputs are cast to the autocast dtype first,
    as PyTorch's SDPA casts them. ``attn_mask`` is bool (True = attend) or float (added
    to the scores; it gets a gradient), broadcastable to (..., Hq, L, S), or a
    ``torch.nn.attention.bias.CausalBias`` (``causal_upper_left`` / ``causal_lower_right``), which selects the
    causal alignment as in PyTorch and is never read as a tensor. NaN or inf where a query
    looks propagates to its output, as in PyTorch. ``is_causal`` lets query i see
    key j iff j <= i (upper-left, PyTorch's alignment); ``causal_variant="lower_right"`` iff
    j <= i + S - L. ``window=(left, right)`` keeps keys within left before and right after the equally
    aligned diagonal (-1 = unbounded). Masks, causal and window intersect; a query that sees no key
    gets 0. ``softcap`` > 0 soft-caps the scaled scores (softcap * tanh(score / softcap)) before the mask is
    added, as FlashAttention's softcap. ``alibi_slopes`` (float32, (Hq,) or broadcasting to (..., Hq)) adds
    FlashAttention's ALiBi bias -slope * |i + S - L - j| to the scores after the soft-cap (it gets no gradient;
    packed nested inputs take (Hq,) or (B, Hq)). ``enable_gqa`` lets query head h read key head
    h // (Hq // Hk) and value head h // (Hq // Hv).

    Jagged nested tensors (B, H, j, E) (``torch.nested``, layout=torch.jagged) run through cusdpa's
    variable-length path; causal and window then align per sequence.

    Dropout draws its seed from torch's CPU generator, so ``torch.manual_seed`` reproduces a run and
    the backward regenerates the forward's keep-mask. CPU tensors run on the NumPy reference; CUDA
    tensors on their own device, on torch's current stream, without copying contiguous inputs. A repeated
    call, eager or compiled, replays the kernel launches its first call prepared
    (cusdpa.backends.plans).
    ``backend`` (a cusdpa.Backend or a sequence of them) restricts the backends tried, like
    ``cusdpa.sdpa_kernel``; by default the ones ``cusdpa.sdpa_kernel`` enables (under torch.compile:
    those enabled when the graph was traced). ``return_lse`` returns (out, lse), lse (..., Hq, L) float32
    (natural log, no gradient); ``deterministic`` makes the backward sum in a fixed order even where
    ``torch.use_deterministic_algorithms`` is off (dense calls only).
    """
    if isinstance(attn_mask, CausalBias):  # a causal alignment, not a mask
        is_causal, causal_variant = arguments.causal_bias(attn_mask, is_causal, causal_variant, query, key)
        attn_mask = None
    if isinstance(query, torch.Tensor):
        dtype = arguments.autocast_dtype(query)
        if dtype is not None:
            query, key, value, attn_mask = arguments.autocast(dtype, query, key, value, attn_mask)
    plain = alibi_slopes is None and arguments.plain_cuda(query, key, value, attn_mask)
    if not plain:  # else checked in a few attribute reads
        tensors = {"query": query, "key": key, "value": value}
        if any(isinstance(t, torch.Tensor) and t.is_nested for t in tensors.values()):
            return nested.attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                    causal_variant, window, softcap, alibi_slopes, backend)
        arguments.check_tensors(tensors, attn_mask, alibi_slopes)
    options, backends = arguments.resolve(dropout_p, is_causal, scale, enable_gqa, causal_variant, window, softcap,
                                          backend, not plain and arguments.tf32_allowed(query))  # plain: fp16/bf16
    out, lse = autograd.attention(*arguments.kernel_operands(query, key, value, options[3]), attn_mask, alibi_slopes,
                                  arguments.draw_seed(dropout_p),
                                  backends, options, check_flag(deterministic, "deterministic"))
    return (out, lse) if return_lse else out


def varlen_attention(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                     is_causal=False, scale=None, enable_gqa=False, *, causal_variant="upper_left", window=None,
                     softcap=0.0, alibi_slopes=None, return_lse=False, deterministic=False, backend=None):
    """Attention over a packed batch of variable-length sequences on torch tensors, with autograd:
    FlashAttention's layout, as ``cusdpa.varlen_attention`` takes it. query (Tq, Hq, E), key (Tk, Hkv, E),
    value (Tk, Hkv, Ev); sequence b holds tokens cu_seqlens_q[b]:cu_seqlens_q[b+1] of the queries and
    cu_seqlens_k[b]:cu_seqlens_k[b+1] of the keys (int32 tensors on the inputs' device). Output (Tq, Hq,
    Ev); with ``return_lse`` also lse (Hq, Tq). The options are ``scaled_dot_product_attention``'s, causal,
    window and ALiBi aligned per sequence (``alibi_slopes`` (Hq,) or (B, Hq))."""
    arguments.check_tensors({"query": query, "key": key, "value": value}, alibi_slopes=alibi_slopes)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        arguments.check_beside(cu, name, query)
    options, backends = arguments.resolve(dropout_p, is_causal, scale, enable_gqa, causal_variant, window, softcap,
                                          backend, arguments.tf32_allowed(query))
    out, lse = autograd.varlen_attention(*arguments.unit_strides(query, key, value), cu_seqlens_q,
                                         cu_seqlens_k, alibi_slopes, max_seqlen_q, max_seqlen_k,
                                         arguments.draw_seed(dropout_p), backends, options,
                                         check_flag(deterministic, "deterministic"))
    return (out, lse) if return_lse else out
