"""FlashAttention's Python API on cusdpa: code written for ``flash_attn`` runs by changing one import,

    from interop.flash_attn_compat import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

with FlashAttention's names, defaults and layouts: (batch, seqlen, heads, head_dim) tensors, packed
(total_tokens, heads, head_dim) ones with int32 ``cu_seqlens``, causal aligned bottom-right,
``window_size=(left, right)`` with -1 for unbounded, ``softmax_scale``, ``softcap``, ``alibi_slopes``
(float32 (H,) or (B, H)), multi- and grouped-query attention by head counts, ``deterministic`` (the
backward sums in a fixed order), ``return_attn_probs`` giving (out, softmax_lse, None): the lse as
FlashAttention returns it, (B, H, L) float32 or packed (H, total_q). The third item, FlashAttention's
S_dmask (the attention probabilities with the dropout pattern, a debugging aid), is not produced: cusdpa's
keep-mask is its own Philox stream (``cusdpa.philox``). Gradients flow as through
``interop.scaled_dot_product_attention``.
"""
from __future__ import annotations

from cusdpa.errors import ArgumentError

from .functional import scaled_dot_product_attention, varlen_attention
from .kv_cache import kv_cache_attention


def _window(window_size) -> tuple | None:
    left, right = (int(w) for w in window_size)
    return None if (left, right) == (-1, -1) else (left, right)


def _options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic) -> dict:
    return dict(dropout_p=dropout_p, scale=softmax_scale, is_causal=causal, causal_variant="lower_right",
                window=_window(window_size), softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic,
                return_lse=True)


def _result(out, lse, return_attn_probs: bool):
    return (out, lse, None) if return_attn_probs else out


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (B, L, H, D), k and v (B, S, Hk, D) with H a multiple of Hk -> out (B, L, H, Dv)."""
    out, lse = scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=q.shape[2] != k.shape[2],
        **_options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic))
    return _result(out.transpose(1, 2), lse, return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """qkv (B, L, 3, H, D)."""
    return flash_attn_func(*qkv.unbind(2), dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (B, L, H, D), kv (B, S, 2, Hk, D)."""
    return flash_attn_func(q, *kv.unbind(2), dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """q (total_q, H, D), k and v (total_k, Hk, D), cu_seqlens int32 (B + 1,). A paged ``block_table`` is
    taken by ``flash_attn_with_kvcache``, not here."""
    if block_table is not None:
        raise NotImplementedError("flash_attn_varlen_func with a block_table (paged keys) is not taken; use "
                                  "flash_attn_with_kvcache for a paged cache")
    out, lse = varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                enable_gqa=q.shape[1] != k.shape[1],
                                **_options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                           deterministic))
    return _result(out, lse, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """qkv (total, 3, H, D)."""
    return flash_attn_varlen_func(*qkv.unbind(1), cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (total_q, H, D), kv (total_k, 2, Hk, D)."""
    return flash_attn_varlen_func(q, *kv.unbind(1), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """``cusdpa``'s KV-cache attention (interop.kv_cache_attention) under FlashAttention's names: k, v new
    tokens written into the cache in place at ``cache_seqlens``. Rotary embeddings and ``cache_leftpad`` are
    not taken (apply rotary to q and k before the call); ``num_splits`` is a scheduling hint, ignored."""
    for name, given in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin), ("cache_leftpad", cache_leftpad)):
        if given is not None:
            raise NotImplementedError(f"flash_attn_with_kvcache: {name} is not taken by cusdpa; apply rotary "
                                      "embeddings before the call, and keep each sequence's cache left-aligned")
    if not isinstance(num_splits, int):
        raise ArgumentError(f"num_splits={num_splits!r} must be an int")
    return kv_cache_attention(q, k_cache, v_cache, cache_seqlens, k, v, block_table=block_table,
                              cache_batch_idx=cache_batch_idx, is_causal=causal, scale=softmax_scale,
                              window=_window(window_size), softcap=softcap, alibi_slopes=alibi_slopes,
                              return_lse=return_softmax_lse)
