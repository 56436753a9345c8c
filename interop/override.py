"""Route ``torch.nn.functional.scaled_dot_product_attention`` in unchanged models to cusdpa.

The override replaces the attribute on ``torch.nn.functional``. That reaches user code calling
``F.scaled_dot_product_attention`` and PyTorch's own Python that looks the name up in that module at
call time (``F.multi_head_attention_forward``, hence nn.MultiheadAttention and the Transformer
layers in training mode); a TorchFunctionMode would not see the calls made inside those functions.
It does not reach code that bound the function under another name before the override, nor the
fused C++ fast paths (nn.MultiheadAttention / TransformerEncoderLayer in eval mode without grad).

Arguments cusdpa cannot take go to PyTorch's own SDPA, with a warning naming the reason, once per
reason: those it cannot take by type, device, dtype or layout (judged from metadata, so also while
torch.compile traces), and in eager mode those no enabled cusdpa backend runs (in a compiled graph
that error propagates: pass a ``backend`` that takes the inputs).
"""
from __future__ import annotations

import contextlib
import warnings

import torch

from . import arguments, bridge, functional

_ORIGINAL = torch.nn.functional.scaled_dot_product_attention
_state = {"backend": None}  # the backend restriction of the active override
_warned: set[str] = set()


def enable_sdpa_override(backend=None) -> None:
    """Route torch.nn.functional.scaled_dot_product_attention to cusdpa until ``disable_sdpa_override``.

    ``backend`` restricts the cusdpa backends (a cusdpa.Backend or a sequence), as in
    ``interop.scaled_dot_product_attention``.
    """
    arguments.backend_names(backend)  # reject a bad backend now rather than at the first call
    _state["backend"] = backend
    torch.nn.functional.scaled_dot_product_attention = _routed


def disable_sdpa_override() -> None:
    """Restore PyTorch's own scaled_dot_product_attention."""
    torch.nn.functional.scaled_dot_product_attention = _ORIGINAL
    _state["backend"] = None


def override_enabled() -> bool:
    return torch.nn.functional.scaled_dot_product_attention is _routed


@contextlib.contextmanager
def sdpa_override(backend=None):
    """``with sdpa_override():`` routes torch.nn.functional.scaled_dot_product_attention to cusdpa in the
    body, and restores whatever was in force before (nesting works)."""
    was_enabled, was_backend = override_enabled(), _state["backend"]
    enable_sdpa_override(backend)
    try:
        yield
    finally:
        if was_enabled:
            enable_sdpa_override(was_backend)
        else:
            disable_sdpa_override()


def unsupported_reason(query, key, value, attn_mask=None, scale=None) -> str | None:
    """Why cusdpa cannot take these arguments (None when it can): read from metadata only, so the
    answer is the same in eager mode and while torch.compile traces."""
    tensors = {"query": query, "key": key, "value": value}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            return f"{name} is a {type(t).__name__}, not a torch.Tensor"
        if t.device.type not in ("cpu", "cuda"):
            return f"{name} is on {t.device.type}; cusdpa runs CPU and CUDA tensors"
        if t.dtype not in bridge.SUPPORTED_DTYPES:
            return f"{name}.dtype={t.dtype} (cusdpa takes float16, bfloat16, float32, float64)"
        if t.is_nested and t.layout != torch.jagged:
            return f"{name} is a nested tensor with layout {t.layout}; cusdpa takes jagged nested tensors"
    if len({t.is_nested for t in tensors.values()}) > 1:
        return "query/key/value mix nested and dense tensors"
    if attn_mask is not None:
        if query.is_nested:
            return "attn_mask with nested tensors"
        if not isinstance(attn_mask, torch.Tensor):
            return f"attn_mask is a {type(attn_mask).__name__}"
        if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
            return f"attn_mask.dtype={attn_mask.dtype}"
    if scale is not None and not scale > 0:
        return f"scale={scale} (cusdpa takes a positive scale)"
    return None


@torch.compiler.assume_constant_result
def _warn_once(reason: str) -> bool:
    # Evaluated for real while torch.compile traces (warnings.warn would break the graph); a constant after.
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"cusdpa sdpa_override: {reason}; falling back to PyTorch's scaled_dot_product_attention",
                      stacklevel=3)
    return True


def _fallback(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    # enable_gqa only when set: PyTorch before 2.5 has no such argument.
    gqa = {"enable_gqa": True} if enable_gqa else {}
    return _ORIGINAL(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **gqa)


def _routed(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    reason = unsupported_reason(query, key, value, attn_mask, scale)
    if reason is not None:
        _warn_once(reason)
        return _fallback(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    try:
        return functional.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                                       enable_gqa, backend=_state["backend"])
    except NotImplementedError as e:  # no enabled cusdpa backend runs these inputs; the message says why
        _warn_once(str(e))
        return _fallback(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


_routed.__doc__ = f"cusdpa's route for torch.nn.functional.scaled_dot_product_attention.\n\n{_ORIGINAL.__doc__}"
