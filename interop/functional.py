"""``scaled_dot_product_attention`` on torch tensors: PyTorch's signature plus cusdpa's extras."""
from __future__ import annotations

import numbers
from typing import Sequence

import torch

from cusdpa import dispatch
from cusdpa.dispatch import Backend

from . import bridge, fastpath, nested, ops


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, causal_variant="upper_left", window=None, backend=None):
    """softmax(scale * query @ key^T + mask) @ value on torch tensors, with autograd; torch.compile-able.

    Shapes: query (..., Hq, L, E), key (..., Hkv, S, E), value (..., Hkv, S, Ev) -> (..., Hq, L, Ev)
    of the input dtype; leading dims broadcast. ``attn_mask`` is bool (True = attend) or float (added
    to the scores; it gets a gradient), broadcastable to (..., Hq, L, S). ``is_causal`` lets query i see
    key j iff j <= i (upper-left, PyTorch's alignment); ``causal_variant="lower_right"`` iff
    j <= i + S - L. ``window=(left, right)`` keeps keys within left before and right after the equally
    aligned diagonal (-1 = unbounded). Masks, causal and window intersect; a query that sees no key
    gets 0. ``enable_gqa`` lets query head h read kv head h // (Hq // Hkv).

    Jagged nested tensors (B, H, j, E) (``torch.nested``, layout=torch.jagged) run through cusdpa's
    variable-length path; causal and window then align per sequence.

    Dropout draws its seed from torch's CPU generator, so ``torch.manual_seed`` reproduces a run and
    the backward regenerates the forward's keep-mask. CPU tensors run on the NumPy reference; CUDA
    tensors on their own device, on torch's current stream, without copying contiguous inputs. A repeated
    call, eager or compiled, replays the kernel launches its first call prepared (interop/plans.py).
    ``backend`` (a cusdpa.Backend or a sequence of them) restricts the backends tried, like
    ``cusdpa.sdpa_kernel``; by default the ones ``cusdpa.sdpa_kernel`` enables (under torch.compile:
    those enabled when the graph was traced).
    """
    tensors = {"query": query, "key": key, "value": value}
    if any(isinstance(t, torch.Tensor) and t.is_nested for t in tensors.values()):
        return nested.attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                causal_variant, window, backend)
    check_tensors(tensors, attn_mask)
    query, key, value = (unit_stride(x) for x in (query, key, value))
    opts = options(dropout_p, is_causal, scale, enable_gqa, causal_variant, window, backend)
    if fastpath.applies(query, key, value, attn_mask):
        out = fastpath.attention(query, key, value, opts)
        if out is not None:
            return out
    out, _ = ops.sdpa_fwd(query, key, value, attn_mask, *opts)
    return out


def check_tensors(tensors: dict, attn_mask=None) -> None:
    """Errors in torch's terms: type, device and dtype of query/key/value (and attn_mask)."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__module__}.{type(t).__name__}; "
                            "NumPy and CuPy arrays go through cusdpa.scaled_dot_product_attention")
        bridge.check_device(t, name)
    query = tensors["query"]
    if query.dtype not in bridge.SUPPORTED_DTYPES:
        raise TypeError(f"query.dtype={query.dtype} is not supported; use one of "
                        f"{', '.join(map(str, bridge.SUPPORTED_DTYPES))} (cast with .to)")
    for name, t in tensors.items():
        if t.dtype != query.dtype:
            raise TypeError(f"query.dtype={query.dtype} but {name}.dtype={t.dtype}; cast them to one dtype with .to")
        if t.device != query.device:
            raise ValueError(f"query is on {query.device} but {name} is on {t.device}; move them to one device "
                             "with .to(query.device)")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.device != query.device:
            raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {query.device}; "
                             "move it with .to(query.device)")
        if attn_mask.dtype != torch.bool and attn_mask.dtype not in bridge.SUPPORTED_DTYPES:
            raise TypeError(f"attn_mask.dtype={attn_mask.dtype} is not supported; use torch.bool (True = attend) "
                            "or a float dtype added to the scores (convert an integer mask with .bool())")


def unit_stride(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its last dim is contiguous (no copy), else a contiguous copy, as PyTorch's
    SDPA does: the fused backends read rows of E elements."""
    return x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()


def options(dropout_p, is_causal, scale, enable_gqa, causal_variant, window, backend) -> tuple:
    """The scalar arguments of the ops, in their order: (dropout_p, is_causal, scale, enable_gqa,
    causal_variant, window, seed, backends). Values are validated by cusdpa inside the op."""
    for name, val in (("dropout_p", dropout_p), ("scale", scale)):
        if not isinstance(val, numbers.Real) and not (name == "scale" and val is None):
            raise TypeError(f"{name}={val!r} must be a real number" + (" or None" if name == "scale" else ""))
    if window is not None and not (isinstance(window, (tuple, list)) and len(window) == 2
                                   and all(isinstance(w, int) for w in window)):
        raise TypeError(f"window={window!r} must be a (left, right) pair of ints (-1 = unbounded)")
    return (float(dropout_p), bool(is_causal), None if scale is None else float(scale), bool(enable_gqa),
            causal_variant, None if window is None else list(window), draw_seed(dropout_p), backend_names(backend))


def draw_seed(dropout_p: float) -> torch.Tensor | None:
    """A dropout seed from torch's default CPU generator (``torch.manual_seed`` sets it), or None without
    dropout. On the CPU so that the op reads it without waiting on a GPU; a tensor so that a compiled
    graph draws a fresh one each call instead of baking one in."""
    if dropout_p <= 0:
        return None
    return torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64)


@torch.compiler.assume_constant_result
def _enabled_names() -> str:
    # Dynamo cannot trace ContextVar.get; evaluated once while tracing, the enabled set is baked in.
    return ",".join(b.value for b in dispatch.enabled_backends())


def backend_names(backend: Backend | Sequence[Backend] | None) -> str:
    """The ops' ``backends`` argument: comma-separated Backend values in priority order."""
    if backend is None:
        return _enabled_names()
    chosen = [backend] if isinstance(backend, Backend) else list(backend)
    for b in chosen:
        if not isinstance(b, Backend):
            raise TypeError(f"backend takes cusdpa.Backend members (or a sequence of them), got {b!r}")
    if not chosen:
        raise ValueError("backend=[] enables no backend; pass None for the default order")
    return ",".join(b.value for b in dispatch.DEFAULT_PRIORITY if b in chosen)
