"""The public functions: validate, dispatch, run; return the caller's array type. A repeated dense call on
CuPy arrays, and its vjp, replay the launches its first call prepared (cusdpa.backends.plans)."""
from __future__ import annotations

import secrets
import sys

from . import dispatch, problem
from .errors import ArgumentError, ArgumentTypeError
from .problem import Options


def _check_dout(dout, xp, out_shape: tuple, dtype):
    """A vjp's dout: an array of the inputs' module (``xp``), the output's shape and the inputs' dtype."""
    if problem.array_module(dout, "dout") is not xp:
        raise ArgumentTypeError(f"dout is a {type(dout).__module__} array but the inputs are {xp.__name__} arrays")
    if tuple(dout.shape) != out_shape:
        raise ArgumentError(f"dout.shape={tuple(dout.shape)} must equal the output shape {out_shape}")
    if dout.dtype != dtype:
        raise ArgumentTypeError(f"dout.dtype={dout.dtype} must equal the input dtype {dtype}")


def _run(pr: problem.Problem, return_lse: bool):
    out, lse = dispatch.select(pr).forward(pr)
    return (out, lse) if return_lse else out


def _vjp(pr: problem.Problem, return_lse: bool, deterministic: bool):
    impl = dispatch.select(pr, need_grad=True)
    out, lse = impl.forward(pr)

    def vjp(dout):
        _check_dout(dout, pr.xp, pr.out_shape, pr.dtype)
        return impl.backward(pr, out, lse, dout, deterministic)

    return ((out, lse) if return_lse else out), vjp


def _plan(query, key, value, options: tuple, seed, training: bool, deterministic: bool = False):
    """The plan of a dense call on CuPy arrays (with ``training``, forward and backward), or None: take the
    general path (no plan for this signature, or arguments only the general path checks: a (seed, offset)
    pair, a list window)."""
    cupy = sys.modules.get("cupy")  # no CuPy imported: no CuPy arrays
    if cupy is None or not (type(query) is type(key) is type(value) is cupy.ndarray):
        return None
    dropout_p, is_causal, scale, enable_gqa, causal_variant, window, softcap, allow_tf32 = options
    if not (seed is None or (type(seed) is int and 0 <= seed < 2**64)) or not (window is None or type(window) is tuple):
        return None
    from .backends import plans

    aligned = (query.data.ptr | key.data.ptr | value.data.ptr) % 16 == 0
    signature = ("cupy", query.shape, query.strides, key.shape, key.strides, value.shape, value.strides, query.dtype,
                 key.dtype, value.dtype, query.device.id, key.device.id, value.device.id, aligned,
                 type(dropout_p), dropout_p, type(is_causal), is_causal, type(scale), scale, type(enable_gqa),
                 enable_gqa, causal_variant, window and tuple(map(type, window)), window, type(softcap), softcap,
                 type(allow_tf32), allow_tf32, dispatch.enabled_key(), dispatch.kernel_config_key(), training,
                 deterministic)

    def make():
        pr = problem.from_dense(query, key, value, None, Options(*options), seed)
        out_strides = plans.contiguous_strides(pr.out_shape)  # dout too: the vjp makes it contiguous
        return plans.build(pr, dispatch.select(pr, need_grad=training).backend, out_strides, backward=training,
                           dout_strides=out_strides, deterministic=deterministic,
                           addresses={"q": query.data.ptr, "k": key.data.ptr, "v": value.data.ptr})

    return plans.lookup(signature, make)


def _planned(query, key, value, options: tuple, seed, return_lse: bool, training: bool = False,
             deterministic: bool = False):
    """The result of a dense call on CuPy arrays through its plan (with ``training``: (result, vjp)), or None
    where the general path serves."""
    plan = _plan(query, key, value, options, seed, training, deterministic)
    if plan is None:
        return None
    import cupy

    if seed is None:
        seed = secrets.randbits(64) if options[0] > 0 else 0
    with cupy.cuda.Device(plan.device):
        out = cupy.empty(plan.out_shape, dtype=query.dtype)
        lse = cupy.empty(plan.lse_shape, dtype="float32")
        plan.run_forward(cupy.cuda.get_current_stream().ptr, query.data.ptr, key.data.ptr, value.data.ptr,
                         out.data.ptr, lse.data.ptr, seed)
    result = (out, lse) if return_lse else out
    if not training:
        return result

    def vjp(dout):
        _check_dout(dout, cupy, plan.out_shape, query.dtype)
        with cupy.cuda.Device(plan.device):
            if not dout.flags.c_contiguous or dout.data.ptr % 16 or dout.device.id != plan.device:
                dout = cupy.ascontiguousarray(cupy.asarray(dout))  # the layout the plan reads
            dq, dk, dv = (cupy.empty(x.shape, dtype=x.dtype) for x in (query, key, value))
            delta = cupy.empty(plan.lse_shape, dtype="float32")
            accum = cupy.empty(plan.dq_accum_elements, dtype="float32") if plan.dq_accum_elements else None
            plan.run_backward(cupy.cuda.get_current_stream().ptr, query.data.ptr, key.data.ptr, value.data.ptr,
                              out.data.ptr, dout.data.ptr, lse.data.ptr, delta.data.ptr, dq.data.ptr, dk.data.ptr,
                              dv.data.ptr, seed, 0 if accum is None else accum.data.ptr)
        return dq, dk, dv

    return result, vjp


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, causal_variant="upper_left", window=None, softcap=0.0,
                                 alibi_slopes=None, seed=None, return_lse=False, allow_tf32=False):
    """softmax(scale * query @ key^T + mask) @ value, on NumPy or CuPy arrays.

    Shapes: query (..., Hq, L, E), key (..., Hkv, S, E), value (..., Hkv, S, Ev) -> output
    (..., Hq, L, Ev) of the input dtype. As in PyTorch, every dim but the last two broadcasts (a rank-2
    input has one head, which stretches like any dim of size 1), and ``enable_gqa`` lets key and value
    heads (the two counts may differ) each divide Hq. E or Ev may be 0 (E = 0: every visible key weighs
    the same). ``attn_mask`` is bool (True = attend) or float (added to the scores), broadcastable to
    (..., Hq, L, S), or a ``cusdpa.BlockMask`` wrapping one, whose block summary FLASH makes once for every
    call it is passed to. ``is_causal`` lets query i see key j iff j <= i (upper-left); with
    ``causal_variant="lower_right"`` iff j <= i + S - L. ``window=(left, right)`` keeps keys within
    left before and right after the (equally aligned) diagonal, -1 = unbounded. Masks, causal and
    window intersect; a query that sees no key gets 0 (lse -inf); NaN or inf at a position a query
    sees propagates to that query's output, as in PyTorch. ``enable_gqa`` lets query head h read key
    head h // (Hq // Hk) and value head h // (Hq // Hv). ``softcap`` > 0 soft-caps the scaled scores,
    softcap * tanh(score / softcap), before the mask is added (FlashAttention's softcap; on the MATH
    backend until the kernels take it). ``alibi_slopes`` (float32, (Hq,) or broadcasting to (..., Hq),
    e.g. FlashAttention's (B, Hq)) adds -slope * |i + S - L - j| to the scores of query i and key j after
    the cap (FlashAttention's ALiBi, aligned bottom-right whatever the causal alignment; on the MATH
    backend until the kernels take it). Dropout's keep-mask is a pure function of
    ``seed`` (an int, or a (seed, offset) pair; None draws one). ``return_lse`` also returns the
    float32 logsumexp (..., Hq, L). ``allow_tf32=True`` lets fp32 inputs take their products on TF32 tensor
    cores (EFFICIENT with ``KernelConfig.tensor_core_fp32``: one TF32 product, a 10-bit mantissa, where fp32
    otherwise takes three, about fp32's accuracy); a precision, not a semantic. Bad arguments raise
    ``cusdpa.ArgumentError`` (a ValueError and a RuntimeError) or ``cusdpa.ArgumentTypeError`` (a TypeError and
    a RuntimeError).
    """
    options = (dropout_p, is_causal, scale, enable_gqa, causal_variant, window, softcap, allow_tf32)
    query, key, value, _ = problem.broadcast_heads(query, key, value, enable_gqa)
    if attn_mask is None and alibi_slopes is None:
        result = _planned(query, key, value, options, seed, return_lse)
        if result is not None:
            return result
    return _run(problem.from_dense(query, key, value, attn_mask, Options(*options), seed, alibi_slopes), return_lse)


def attention_vjp(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                  enable_gqa=False, *, causal_variant="upper_left", window=None, softcap=0.0, alibi_slopes=None,
                  seed=None, return_lse=False, deterministic=False, allow_tf32=False):
    """(output, vjp): as ``scaled_dot_product_attention``, plus ``vjp(dout)`` returning (dq, dk, dv), and
    d(attn_mask) fourth for a float mask. ``deterministic=True`` asks for bit-identical gradients run
    to run (FLASH on Hopper orders its dQ additions: 0.84-0.99x the default's speed, and head dims above
    128 take a second fp32 dQ workspace; BENCHMARKS.md). Dropout reuses the forward's seed, so the
    backward sees the same keep-mask."""
    shapes = (query.shape, key.shape, value.shape)
    query, key, value, heads = problem.broadcast_heads(query, key, value, enable_gqa)
    options = (dropout_p, is_causal, scale, enable_gqa, causal_variant, window, softcap, allow_tf32)
    planned = None
    if attn_mask is None and alibi_slopes is None:
        planned = _planned(query, key, value, options, seed, return_lse, training=True, deterministic=deterministic)
    if planned is not None:
        result, vjp = planned
    else:
        pr = problem.from_dense(query, key, value, attn_mask, Options(*options), seed, alibi_slopes)
        result, vjp = _vjp(pr, return_lse, deterministic)
    if heads is None:
        return result, vjp
    return result, lambda dout: problem.sum_head_grads(heads, vjp(dout), shapes)


def varlen_attention(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                     is_causal=False, scale=None, enable_gqa=False, *, causal_variant="upper_left", window=None,
                     softcap=0.0, alibi_slopes=None, seed=None, return_lse=False, allow_tf32=False):
    """Attention over a packed batch of variable-length sequences (FlashAttention's layout).

    query (Tq, Hq, E), key (Tk, Hkv, E), value (Tk, Hkv, Ev); sequence b holds query tokens
    cu_seqlens_q[b]:cu_seqlens_q[b+1] and key tokens cu_seqlens_k[b]:cu_seqlens_k[b+1] (int32, B + 1
    entries). Output (Tq, Hq, Ev); lse (Hq, Tq). Causal and window align per sequence, as in
    ``scaled_dot_product_attention``; dropout's batch-head index is b * Hq + h, rows and columns
    count from each sequence's start, and so does ALiBi (``alibi_slopes`` (Hq,) or (B, Hq)).
    """
    pr = problem.from_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             Options(dropout_p, is_causal, scale, enable_gqa, causal_variant, window, softcap,
                                     allow_tf32), seed, alibi_slopes)
    return _run(pr, return_lse)


def varlen_attention_vjp(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *,
                         causal_variant="upper_left", window=None, softcap=0.0, alibi_slopes=None, seed=None,
                         return_lse=False, deterministic=False, allow_tf32=False):
    """(output, vjp) for ``varlen_attention``; ``vjp(dout)`` returns (dq, dk, dv) in the packed layout."""
    pr = problem.from_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             Options(dropout_p, is_causal, scale, enable_gqa, causal_variant, window, softcap,
                                     allow_tf32), seed, alibi_slopes)
    return _vjp(pr, return_lse, deterministic)


def explain(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *,
            causal_variant="upper_left", window=None, softcap=0.0, alibi_slopes=None, seed=None,
            need_grad=False, allow_tf32=False) -> dispatch.Explanation:
    """Which backend would run these dense inputs, and the reasons each other backend would not."""
    query, key, value, _ = problem.broadcast_heads(query, key, value, enable_gqa)
    pr = problem.from_dense(query, key, value, attn_mask,
                            Options(dropout_p, is_causal, scale, enable_gqa, causal_variant, window, softcap,
                                    allow_tf32), seed, alibi_slopes)
    return dispatch.explain_problem(pr, need_grad)
