"""The public functions: validate, dispatch, run; return the caller's array type."""
from __future__ import annotations

from . import checks, dispatch


def _check_dout(pr: checks.Problem, dout):
    if checks.array_module(dout, "dout") is not pr.xp:
        raise TypeError(f"dout is a {type(dout).__module__} array but the inputs are {pr.xp.__name__} arrays")
    if tuple(dout.shape) != pr.out_shape:
        raise ValueError(f"dout.shape={tuple(dout.shape)} must equal the output shape {pr.out_shape}")
    if dout.dtype != pr.dtype:
        raise TypeError(f"dout.dtype={dout.dtype} must equal the input dtype {pr.dtype}")


def _run(pr: checks.Problem, return_lse: bool):
    out, lse = dispatch.select(pr).forward(pr)
    return (out, lse) if return_lse else out


def _vjp(pr: checks.Problem, return_lse: bool, deterministic: bool):
    impl = dispatch.select(pr, need_grad=True)
    out, lse = impl.forward(pr)

    def vjp(dout):
        _check_dout(pr, dout)
        return impl.backward(pr, out, lse, dout, deterministic)

    return ((out, lse) if return_lse else out), vjp


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, causal_variant="upper_left", window=None, seed=None,
                                 return_lse=False):
    """softmax(scale * query @ key^T + mask) @ value, on NumPy or CuPy arrays.

    Shapes: query (..., Hq, L, E), key (..., Hkv, S, E), value (..., Hkv, S, Ev) -> output
    (..., Hq, L, Ev) of the input dtype; leading dims broadcast; rank-2 inputs mean one head.
    ``attn_mask`` is bool (True = attend) or float (added to the scores), broadcastable to
    (..., Hq, L, S). ``is_causal`` lets query i see key j iff j <= i (upper-left); with
    ``causal_variant="lower_right"`` iff j <= i + S - L. ``window=(left, right)`` keeps keys within
    left before and right after the (equally aligned) diagonal, -1 = unbounded. Masks, causal and
    window intersect; a query that sees no key gets 0 (lse -inf). ``enable_gqa`` lets query head h
    read kv head h // (Hq // Hkv). Dropout's keep-mask is a pure function of ``seed`` (an int, or a
    (seed, offset) pair; None draws one). ``return_lse`` also returns the float32 logsumexp
    (..., Hq, L).
    """
    pr = checks.problem_from_dense(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                   causal_variant, window, seed)
    return _run(pr, return_lse)


def attention_vjp(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                  enable_gqa=False, *, causal_variant="upper_left", window=None, seed=None, return_lse=False,
                  deterministic=False):
    """(output, vjp): as ``scaled_dot_product_attention``, plus ``vjp(dout)`` returning (dq, dk, dv), and
    d(attn_mask) fourth for a float mask. ``deterministic=True`` asks for bit-identical gradients run
    to run. Dropout reuses the forward's seed, so the backward sees the same keep-mask."""
    pr = checks.problem_from_dense(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                   causal_variant, window, seed)
    return _vjp(pr, return_lse, deterministic)


def varlen_attention(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                     is_causal=False, scale=None, enable_gqa=False, *, causal_variant="upper_left", window=None,
                     seed=None, return_lse=False):
    """Attention over a packed batch of variable-length sequences (FlashAttention's layout).

    query (Tq, Hq, E), key (Tk, Hkv, E), value (Tk, Hkv, Ev); sequence b holds query tokens
    cu_seqlens_q[b]:cu_seqlens_q[b+1] and key tokens cu_seqlens_k[b]:cu_seqlens_k[b+1] (int32, B + 1
    entries). Output (Tq, Hq, Ev); lse (Hq, Tq). Causal and window align per sequence, as in
    ``scaled_dot_product_attention``; dropout's batch-head index is b * Hq + h, rows and columns
    count from each sequence's start.
    """
    pr = checks.problem_from_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    dropout_p, is_causal, scale, enable_gqa, causal_variant, window, seed)
    return _run(pr, return_lse)


def varlen_attention_vjp(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *,
                         causal_variant="upper_left", window=None, seed=None, return_lse=False,
                         deterministic=False):
    """(output, vjp) for ``varlen_attention``; ``vjp(dout)`` returns (dq, dk, dv) in the packed layout."""
    pr = checks.problem_from_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    dropout_p, is_causal, scale, enable_gqa, causal_variant, window, seed)
    return _vjp(pr, return_lse, deterministic)


def explain(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *,
            causal_variant="upper_left", window=None, seed=None, need_grad=False) -> dispatch.Explanation:
    """Which backend would run these dense inputs, and the reasons each other backend would not."""
    pr = checks.problem_from_dense(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                   causal_variant, window, seed)
    return dispatch.explain_problem(pr, need_grad)
