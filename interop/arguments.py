"""The torch-side arguments of an attention call: errors in torch's terms for the tensors, and the scalar
options turned into what the custom ops take (the values of ``cusdpa.problem.Options``, a dropout seed
drawn from torch's generator, the backends to try)."""
from __future__ import annotations

from typing import Sequence

import torch

from cusdpa import dispatch, problem
from cusdpa.dispatch import Backend
from cusdpa.errors import ArgumentError, ArgumentTypeError
from cusdpa.problem import OPTION_NAMES, Options

from . import bridge


def check_tensors(tensors: dict, attn_mask=None, alibi_slopes=None) -> None:
    """Errors in torch's terms: type, device and dtype of query/key/value (and attn_mask, alibi_slopes; their
    shapes cusdpa checks)."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(t).__module__}.{type(t).__name__}; "
                                    "NumPy and CuPy arrays go through cusdpa.scaled_dot_product_attention")
        bridge.check_device(t, name)
    query = tensors["query"]
    if query.dtype not in bridge.SUPPORTED_DTYPES:
        raise ArgumentTypeError(f"query.dtype={query.dtype} is not supported; use one of "
                                f"{', '.join(map(str, bridge.SUPPORTED_DTYPES))} (cast with .to)")
    for name, t in tensors.items():
        if t.dtype != query.dtype:
            raise ArgumentTypeError(f"query.dtype={query.dtype} but {name}.dtype={t.dtype}; cast them to one dtype "
                                    "with .to")
        if t.device != query.device:
            raise ArgumentError(f"query is on {query.device} but {name} is on {t.device}; move them to one device "
                                "with .to(query.device)")
    if attn_mask is not None:
        check_beside(attn_mask, "attn_mask", query)
        if attn_mask.dtype != torch.bool and attn_mask.dtype not in bridge.SUPPORTED_DTYPES:
            raise ArgumentTypeError(f"attn_mask.dtype={attn_mask.dtype} is not supported; use torch.bool "
                                    "(True = attend) or a float dtype added to the scores (convert an integer mask "
                                    "with .bool())")
    if alibi_slopes is not None:
        check_beside(alibi_slopes, "alibi_slopes", query)
        if alibi_slopes.dtype != torch.float32:
            raise ArgumentTypeError(f"alibi_slopes.dtype={alibi_slopes.dtype} must be torch.float32 (as "
                                    "FlashAttention's)")


def check_beside(t, name: str, query: torch.Tensor) -> None:
    """A tensor argument beside the inputs (a mask, ALiBi slopes): a torch.Tensor on query's device."""
    if not isinstance(t, torch.Tensor):
        raise ArgumentTypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.device != query.device:
        raise ArgumentError(f"{name} is on {t.device} but query is on {query.device}; move it with "
                            ".to(query.device)")


def causal_bias(attn_mask, is_causal, causal_variant: str, query, key) -> tuple:
    """(is_causal, causal_variant) for a ``torch.nn.attention.bias.CausalBias`` attn_mask, which is no dense
    mask (its storage is a placeholder): causal attention, aligned as PyTorch's SDPA aligns it (upper-left for
    ``causal_upper_left`` and for square biases, else lower-right), as long as the bias was made for these
    query and key lengths."""
    from torch.nn.attention.bias import CausalVariant

    L, S = attn_mask.seq_len_q, attn_mask.seq_len_kv
    if is_causal:
        raise ArgumentError("attn_mask is a CausalBias and is_causal=True: pass one of them")
    if causal_variant != "upper_left":
        raise ArgumentError(f"attn_mask is a CausalBias and causal_variant={causal_variant!r}: the bias decides "
                            "the alignment (causal_upper_left or causal_lower_right)")
    if isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor) and not (query.is_nested or key.is_nested) \
            and query.dim() >= 2 and key.dim() >= 2 and (query.shape[-2], key.shape[-2]) != (L, S):
        raise ArgumentError(f"attn_mask is a CausalBias for {L} queries and {S} keys, but query has "
                            f"{query.shape[-2]} and key {key.shape[-2]}; make it with these lengths")
    lower_right = attn_mask.variant == CausalVariant.LOWER_RIGHT and L != S
    return True, "lower_right" if lower_right else "upper_left"


_FAST_DTYPES = (torch.float16, torch.bfloat16)


def plain_cuda(query, key, value, attn_mask) -> bool:
    """The common call, which ``check_tensors`` would pass: dense fp16/bf16 CUDA tensors of class Tensor on one
    device, of one dtype, without a mask."""
    return (type(query) is torch.Tensor and type(key) is torch.Tensor and type(value) is torch.Tensor
            and attn_mask is None and query.is_cuda and query.dtype in _FAST_DTYPES and key.dtype == query.dtype
            and value.dtype == query.dtype and query.get_device() == key.get_device() == value.get_device()
            and not (query.is_nested or key.is_nested or value.is_nested))


def unit_strides(*tensors: torch.Tensor) -> tuple:
    """``tensors``, each itself where its last dim is contiguous (no copy), else a contiguous copy, as PyTorch's
    SDPA does: the fused backends read rows of E elements. The common call (every last dim contiguous) in one
    loop of stride reads, which per-tensor calls took twice as long for (an eager call's host time); the
    stride tuple's last item, since ``stride(-1)`` costs twice as much as ``stride()``."""
    for t in tensors:
        if t.stride()[-1] != 1 and t.shape[-1] > 1:
            return tuple(x if x.shape[-1] <= 1 or x.stride()[-1] == 1 else x.contiguous() for x in tensors)
    return tensors


def kernel_operands(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, enable_gqa: bool) -> tuple:
    """``unit_strides(*broadcast_heads(query, key, value, enable_gqa))``; the common call (heads that meet, last
    dims contiguous) answered from one shape and one stride read per tensor, which the two steps read twice (a
    third of a microsecond of every eager call on the CPU machine)."""
    qs, ks, vs = query.shape, key.shape, value.shape
    if len(qs) >= 3 and len(ks) >= 3 and len(vs) >= 3 and qs[-3] == ks[-3] == vs[-3]:
        if query.stride()[-1] == 1 and key.stride()[-1] == 1 and value.stride()[-1] == 1:
            return query, key, value
        return unit_strides(query, key, value)
    return unit_strides(*broadcast_heads(query, key, value, enable_gqa))


def options(dropout_p, is_causal, scale, enable_gqa, causal_variant, window, softcap, allow_tf32=False) -> tuple:
    """The values of ``Options`` in the order of its fields, as the ops take them (``window`` a list, as
    their schema says). Types are checked here, as cusdpa checks them (a bool is not a number, a number is
    not a bool); values by cusdpa inside the op."""
    if window is not None and not (isinstance(window, (tuple, list)) and len(window) == 2
                                   and all(isinstance(w, int) and not isinstance(w, bool) for w in window)):
        raise ArgumentTypeError(f"window={window!r} must be a (left, right) pair of ints (-1 = unbounded)")
    return (problem.check_real(dropout_p, "dropout_p"), problem.check_flag(is_causal, "is_causal"),
            problem.check_real(scale, "scale", optional=True), problem.check_flag(enable_gqa, "enable_gqa"),
            causal_variant, None if window is None else list(window), problem.check_real(softcap, "softcap"),
            problem.check_flag(allow_tf32, "allow_tf32"))


def tf32_allowed(query) -> bool:
    """Whether fp32 CUDA inputs may take TF32 products (Options.allow_tf32): PyTorch's switch for its own fp32
    matmuls on CUDA. Read for fp32 CUDA tensors only (a property read per call)."""
    return isinstance(query, torch.Tensor) and query.dtype == torch.float32 and query.device.type == "cuda" and \
        tf32_matmuls()


@torch.compiler.assume_constant_result  # Dynamo cannot trace the read; a compiled graph takes the traced value
def tf32_matmuls() -> bool:
    """torch.backends.cuda.matmul.fp32_precision == "tf32", which the legacy allow_tf32 = True and
    set_float32_matmul_precision("high") set too (reading the legacy flag raises once the new API was used)."""
    return torch.backends.cuda.matmul.fp32_precision == "tf32"


def broadcast_heads(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, enable_gqa: bool) -> tuple:
    """query, key and value with their heads meeting as the kernels take them (``problem.head_plan``:
    PyTorch's broadcasting of heads and ranks, and grouped key and value heads of different counts), made
    with torch's expand and repeat_interleave, so that autograd sums each input's gradient over its copies."""
    plan = problem.head_plan(query.shape, key.shape, value.shape, enable_gqa)
    if plan is None:
        return query, key, value

    def heads(x: torch.Tensor, count: int, repeat: int) -> torch.Tensor:
        x3 = x if x.dim() >= 3 else x.unsqueeze(0)
        if x3.shape[-3] == count:
            return x
        if x3.shape[-3] == 1:
            return x3.expand(*x3.shape[:-3], count, *x3.shape[-2:])
        return x3.repeat_interleave(repeat, dim=-3)

    return heads(query, plan.hq, 1), heads(key, plan.hkv, plan.k_repeat), heads(value, plan.hkv, plan.v_repeat)


def autocast_dtype(tensor) -> torch.dtype | None:
    """The dtype autocast casts attention's inputs on ``tensor``'s device to, or None outside autocast (and on
    devices cusdpa does not run, which the argument checks then name). Outside any autocast region, the
    common call, one C call answers (reading the device type would cost three times as much)."""
    if not torch._C._is_any_autocast_enabled():
        return None
    device_type = tensor.device.type
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast(dtype: torch.dtype, *tensors) -> tuple:
    """``tensors`` as autocast gives them to PyTorch's SDPA (its lower-precision list): every floating
    tensor but a float64 one cast to ``dtype``; bool masks and None as they are."""
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in tensors)


def from_op(values) -> Options:
    """The ``Options`` of the ops' option arguments (the inverse of ``options``)."""
    named = dict(zip(OPTION_NAMES, values))
    if named["window"] is not None:
        named["window"] = tuple(named["window"])
    return Options(**named)


_resolved: dict = {}  # the arguments of ``resolve`` (with their types) -> its result


def resolve(dropout_p, is_causal, scale, enable_gqa, causal_variant, window, softcap, backend,
            allow_tf32=False) -> tuple[tuple, str]:
    """(``options(...)``, ``backend_names(backend)``), remembered per distinct argument values: a model calls
    attention with the same few option sets over and over."""
    try:
        if torch.compiler.is_compiling():
            raise TypeError  # no memo while Dynamo traces: the result is a constant of the graph
        key = (dropout_p, type(dropout_p), is_causal, type(is_causal), scale, type(scale), enable_gqa,
               type(enable_gqa), causal_variant, window, softcap, type(softcap), allow_tf32, type(backend),
               backend if backend is None or type(backend) is Backend else tuple(backend),
               dispatch.enabled_key() if backend is None else None)
        found = _resolved.get(key)
    except TypeError:  # unhashable arguments: checked (and any error raised) without the memo
        return (options(dropout_p, is_causal, scale, enable_gqa, causal_variant, window, softcap, allow_tf32),
                backend_names(backend))
    if found is None:
        found = (options(dropout_p, is_causal, scale, enable_gqa, causal_variant, window, softcap, allow_tf32),
                 backend_names(backend))
        if len(_resolved) > 1024:  # bounded: the arguments are the caller's, whatever they are
            _resolved.clear()
        _resolved[key] = found
    return found


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
    return dispatch.enabled_key()


def backend_names(backend: Backend | Sequence[Backend] | None) -> str:
    """The ops' ``backends`` argument: comma-separated Backend values in priority order."""
    if backend is None:
        return _enabled_names()
    chosen = [backend] if isinstance(backend, Backend) else list(backend)
    for b in chosen:
        if not isinstance(b, Backend):
            raise ArgumentTypeError(f"backend takes cusdpa.Backend members (or a sequence of them), got {b!r}")
    if not chosen:
        raise ArgumentError("backend=[] enables no backend; pass None for the default order")
    return ",".join(b.value for b in dispatch.DEFAULT_PRIORITY if b in chosen)
