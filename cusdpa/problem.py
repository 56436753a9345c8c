"""The Problem: every entry point turns its arguments into one validated ``Problem``, which also
carries the scalars every backend derives from them (the window with causal folded in, the seed's
Philox key words, the dropout keep threshold), computed here once.

``Options`` holds the scalar arguments of an attention call as one frozen record; the torch bridge
derives its custom ops' schemas from its fields, so an option is added in one place.

Each error names the argument, the offending value and the fix. Nothing here touches a GPU except
reading a varlen ``cu_seqlens`` back to the host (B + 1 integers) to check it.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import secrets
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from . import philox
from .block_mask import BlockMask
from .errors import ArgumentError, ArgumentTypeError

SUPPORTED_DTYPES = ("float16", "bfloat16", "float32", "float64")
CAUSAL_VARIANTS = ("upper_left", "lower_right")


def array_module(x, name: str):
    """NumPy or CuPy, by the array's type; anything else is a TypeError."""
    if isinstance(x, np.ndarray):
        return np
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    raise ArgumentTypeError(
        f"{name} must be a numpy.ndarray or cupy.ndarray, got {type(x).__module__}.{type(x).__name__}; "
        "torch tensors go through interop.scaled_dot_product_attention"
    )


def device_of(x) -> str:
    """'cpu' for NumPy arrays, 'cuda:N' for CuPy arrays."""
    return "cpu" if isinstance(x, np.ndarray) else f"cuda:{x.device.id}"


@dataclass(frozen=True)
class Options:
    """The scalar arguments of one attention call, as the caller gave them (checked when a Problem is
    built). ``window`` is a (left, right) pair, -1 = unbounded; ``causal_variant`` "upper_left" or
    "lower_right" aligns both causal and window; ``softcap`` > 0 caps the scaled scores at
    softcap * tanh(score / softcap) before a float mask is added (FlashAttention's logit soft-capping;
    0 = off). ``allow_tf32`` lets fp32 inputs take their tile products on TF32 tensor cores (a 10-bit
    mantissa, as torch.backends.cuda.matmul.fp32_precision = "tf32" lets PyTorch's matmuls): a precision,
    not a semantic; the backends that have no TF32 path compute as without it."""

    dropout_p: float = 0.0
    is_causal: bool = False
    scale: Optional[float] = None
    enable_gqa: bool = False
    causal_variant: str = "upper_left"
    window: Optional[tuple[int, int]] = None
    softcap: float = 0.0
    allow_tf32: bool = False


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(Options))


@dataclass(frozen=True)
class Varlen:
    """Packed variable-length batch: sequence b holds tokens cu_seqlens[b] : cu_seqlens[b + 1]."""

    cu_seqlens_q: Any  # int32 array (B + 1,), same array type as q
    cu_seqlens_k: Any
    max_seqlen_q: int
    max_seqlen_k: int
    host_cu_q: np.ndarray  # int64 host copies, for the reference and for kernel grid sizes
    host_cu_k: np.ndarray

    @property
    def batch(self) -> int:
        return len(self.host_cu_q) - 1


@dataclass(frozen=True)
class Problem:
    """Validated attention arguments.

    Dense: q (*batch, Hq, L, E), k (*batch, Hkv, S, E), v (*batch, Hkv, S, Ev) with batch dims
    broadcasting to ``batch_shape`` (rank-2 inputs are viewed with one head). Varlen: q (Tq, Hq, E),
    k (Tk, Hkv, E), v (Tk, Hkv, Ev) and ``varlen`` set.
    """

    xp: Any
    q: Any
    k: Any
    v: Any
    batch_shape: tuple
    hq: int
    hkv: int
    L: int
    S: int
    E: int
    Ev: int
    dtype: np.dtype
    scale: float
    mask: Any = None
    mask_kind: str | None = None  # None, "bool" or "float"
    # where the mask came as a BlockMask: its summaries, which FLASH fills and reuses (launches.mask_values)
    mask_summaries: Optional[dict] = None
    causal: bool = False
    lower_right: bool = False  # alignment of both causal and window
    window: tuple[int, int] | None = None  # (left, right), -1 = unbounded
    dropout_p: float = 0.0
    softcap: float = 0.0  # > 0: scaled scores become softcap * tanh(score / softcap)
    allow_tf32: bool = False  # fp32 products may run on TF32 tensor cores (Options.allow_tf32)
    # ALiBi: float32 (..., Hq) broadcasting to batch_shape + (Hq,); key j gets -slope * |i + S - L - j|
    alibi_slopes: Any = None
    seed: int = 0
    offset: int = 0
    out_rank: int = 4  # rank of the caller's output; 2 means no head dim
    varlen: Varlen | None = None

    @property
    def q3(self):
        """query with a head dim (rank-2 inputs get one head)."""
        return self.q if self.q.ndim >= 3 else self.q[None]

    @property
    def k3(self):
        return self.k if self.k.ndim >= 3 else self.k[None]

    @property
    def v3(self):
        return self.v if self.v.ndim >= 3 else self.v[None]

    @property
    def group(self) -> int:
        """Query heads per kv head (GQA): query head h reads kv head h // group."""
        return self.hq // self.hkv

    @property
    def device(self) -> str:
        return device_of(self.q)

    @property
    def dtype_name(self) -> str:
        return _name_of(self.dtype)

    @property
    def out_shape(self) -> tuple:
        if self.varlen is not None:
            return (self.q.shape[0], self.hq, self.Ev)
        shape = self.batch_shape + (self.hq, self.L, self.Ev)
        return shape[len(shape) - self.out_rank:]

    @property
    def lse_shape(self) -> tuple:
        if self.varlen is not None:
            return (self.hq, self.q.shape[0])
        return self.out_shape[:-1]

    @functools.cached_property
    def window_bounds(self) -> tuple[int, int]:
        """(left, right) keys around the aligned diagonal, -1 = unbounded, with causal folded in as
        right <= 0: the one visibility rule every kernel applies."""
        left, right = self.window if self.window is not None else (-1, -1)
        if self.causal:
            right = 0 if right < 0 else min(right, 0)
        return left, right

    @property
    def seed_words(self) -> tuple[int, int]:
        """The Philox key: (seed & 0xffffffff, seed >> 32)."""
        return self.seed & 0xFFFFFFFF, self.seed >> 32

    @functools.cached_property
    def keep_threshold(self) -> int:
        """An element survives dropout iff its Philox word is below this (0xffffffff without dropout)."""
        return philox.keep_threshold(self.dropout_p) if self.dropout_p > 0 else 0xFFFFFFFF

    @property
    def dropout_rescale(self) -> float:
        """The factor of kept probabilities, 1 / (1 - p); 0 when p == 1 (everything dropped)."""
        return 1.0 / (1.0 - self.dropout_p) if self.dropout_p < 1 else 0.0

    @property
    def num_bh(self) -> int:
        """Flattened batch-head count: the ``bh`` of the dropout counter runs over 0..num_bh-1."""
        if self.varlen is not None:
            return self.varlen.batch * self.hq
        return math.prod(self.batch_shape) * self.hq


def _dtype_name(x) -> str:
    return _name_of(x.dtype)


@functools.cache
def _name_of(dtype) -> str:
    """``dtype.name``, remembered per dtype (NumPy composes it on every read, a few microseconds each)."""
    return np.dtype(dtype).name


def _check_dtype(x, name: str) -> np.dtype:
    if _dtype_name(x) not in SUPPORTED_DTYPES:
        raise ArgumentTypeError(
            f"{name}.dtype={x.dtype} is not supported; use one of {', '.join(SUPPORTED_DTYPES)} "
            "(cast with .astype)"
        )
    return np.dtype(x.dtype)


def _check_arrays(q, k, v):
    xp = array_module(q, "query")
    for name, x in (("key", k), ("value", v)):
        if array_module(x, name) is not xp:
            raise ArgumentTypeError(
                f"query is a {xp.__name__} array but {name} is a {type(x).__module__} array; "
                "NumPy and CuPy arrays cannot be mixed (move them with cupy.asarray / cupy.asnumpy)"
            )
    dtype = _check_dtype(q, "query")
    for name, x in (("key", k), ("value", v)):
        if _check_dtype(x, name) != dtype:
            raise ArgumentTypeError(
                f"query.dtype={q.dtype} but {name}.dtype={x.dtype}; query, key and value must share one dtype"
            )
    if xp is not np:
        devices = {name: device_of(x) for name, x in (("query", q), ("key", k), ("value", v))}
        if len(set(devices.values())) > 1:
            raise ArgumentError(f"inputs are on different devices {devices}; move them to one device")
    return xp, dtype


def check_flag(value, name: str) -> bool:
    """A bool argument (is_causal, enable_gqa): a Python or NumPy bool, as PyTorch takes only bools. A
    positionally ported call (FlashAttention's softmax_scale landing on is_causal) fails here instead of
    running with a truthy float."""
    if not isinstance(value, (bool, np.bool_)):
        raise ArgumentTypeError(f"{name}={value!r} must be a bool (True or False), got {type(value).__name__}")
    return bool(value)


def check_real(value, name: str, optional: bool = False) -> float | None:
    """A real-number argument (dropout_p, scale): ints and floats of Python or NumPy, never a bool (which is
    an int to Python, and a sign of arguments passed in the wrong order)."""
    if value is None and optional:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name}={value!r} must be a real number" + (" or None" if optional else "")
                                + f", got {type(value).__name__}")
    return float(value)


def _check_scale(scale, E: int) -> float:
    scale = check_real(scale, "scale", optional=True)
    if scale is None:
        # With E = 0 every score is exactly 0 whatever the scale (PyTorch's 1/sqrt(0) = inf multiplies no
        # element); 1 keeps 0 * scale finite where a float mask is added.
        return 1.0 / math.sqrt(E) if E else 1.0
    if not math.isfinite(scale) or scale <= 0:
        raise ArgumentError(f"scale={scale} must be finite and positive; pass None for 1/sqrt(E)")
    return scale


def _check_softcap(softcap) -> float:
    cap = check_real(softcap, "softcap")
    if not (math.isfinite(cap) and cap >= 0):
        raise ArgumentError(f"softcap={softcap} must be finite and >= 0 (0 turns soft-capping off)")
    return cap


def _check_dropout(dropout_p, seed):
    p = check_real(dropout_p, "dropout_p")
    if not 0.0 <= p <= 1.0:  # also rejects NaN
        raise ArgumentError(f"dropout_p={dropout_p} must be in [0, 1]")
    offset = 0
    if isinstance(seed, tuple):
        if len(seed) != 2:
            raise ArgumentError(f"seed={seed!r} must be an int or a (seed, offset) pair")
        seed, offset = seed
    if seed is None:
        seed = secrets.randbits(64) if p > 0 else 0
    for name, val, bits in (("seed", seed, 64), ("seed offset", offset, 32)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)):
            raise ArgumentTypeError(f"{name}={val!r} must be an int")
        if not 0 <= int(val) < 2**bits:
            raise ArgumentError(f"{name}={val} must be in [0, 2**{bits})")
    return p, int(seed), int(offset)


def _check_causal(is_causal, causal_variant, window):
    if causal_variant not in CAUSAL_VARIANTS:
        raise ArgumentError(f"causal_variant={causal_variant!r} must be one of {CAUSAL_VARIANTS}")
    if window is not None:
        if not (isinstance(window, (tuple, list)) and len(window) == 2
                and all(isinstance(w, (int, np.integer)) and not isinstance(w, bool) for w in window)):
            raise ArgumentTypeError(f"window={window!r} must be a (left, right) pair of ints (-1 = unbounded)")
        window = (int(window[0]), int(window[1]))
        if min(window) < -1:
            raise ArgumentError(f"window={window} must hold sizes >= 0, or -1 for unbounded")
        if window == (-1, -1):
            window = None
    return check_flag(is_causal, "is_causal"), causal_variant == "lower_right", window


def _check_beside(x, name: str, xp, device: str, full_shape: tuple, hint: str):
    """An array argument beside the inputs (a mask, ALiBi slopes): query's array type and device, and a shape
    that broadcasts to ``full_shape`` (``hint`` says what it should be)."""
    if array_module(x, name) is not xp:
        raise ArgumentTypeError(f"{name} is a {type(x).__module__} array but query is a {xp.__name__} "
                                "array; NumPy and CuPy arrays cannot be mixed")
    if device_of(x) != device:
        raise ArgumentError(f"{name} is on {device_of(x)} but query is on {device}; move it")
    shape = tuple(x.shape)
    padded = (1,) * (len(full_shape) - len(shape)) + shape
    if len(shape) > len(full_shape) or any(m not in (1, f) for m, f in zip(padded, full_shape)):
        raise ArgumentError(f"{name}.shape={shape} does not broadcast to {full_shape}; {hint}")


def _check_mask(attn_mask, xp, full_shape: tuple, device: str):
    if attn_mask is None:
        return None, None
    _check_beside(attn_mask, "attn_mask", xp, device, full_shape,
                  "(..., Hq, L, S): give it size 1 or the full size in each dim")
    name = _dtype_name(attn_mask)
    if name == "bool":
        kind = "bool"
    elif name in SUPPORTED_DTYPES:
        kind = "float"
    else:
        raise ArgumentTypeError(
            f"attn_mask.dtype={attn_mask.dtype} is not supported; use bool (True = attend) or a float "
            "dtype added to the scores (convert an integer mask with mask.astype(bool))"
        )
    return attn_mask, kind


def check_alibi(slopes, xp, full_shape: tuple, device: str):
    """ALiBi slopes as FlashAttention takes them: float32, one per query head, (Hq,) or broadcasting to
    ``full_shape`` = (..., Hq), e.g. (B, Hq)."""
    if slopes is None:
        return None
    hint = "one slope per query head: (Hq,) or (batch..., Hq)"
    _check_beside(slopes, "alibi_slopes", xp, device, full_shape, hint)
    if slopes.ndim == 0 or slopes.shape[-1] != full_shape[-1]:
        raise ArgumentError(f"alibi_slopes.shape={tuple(slopes.shape)} must hold {hint}, Hq={full_shape[-1]}")
    if _dtype_name(slopes) != "float32":
        raise ArgumentTypeError(f"alibi_slopes.dtype={slopes.dtype} must be float32 (as FlashAttention's)")
    return slopes


@dataclass(frozen=True)
class HeadPlan:
    """How query, key and value heads that differ meet, as PyTorch's SDPA lets them: by broadcasting (a
    dim of size 1, a rank-2 input included, stretches to the others) or, with ``enable_gqa``, by grouping
    (key and value heads each dividing the query heads, their counts possibly different). The kernels take
    one head count for key and value, dividing the query's; ``broadcast_heads`` (here for arrays,
    ``interop.arguments`` for tensors) turns the inputs into that before a Problem is built, so the
    gradient of each input comes back summed over its copies."""

    hq: int  # query heads of the call, the output's
    hkv: int  # key/value heads the kernels read
    expand_q: bool  # query has one head, broadcast (a stride-0 view) to hq
    k_repeat: int  # each key head repeated this many times (a single head as a stride-0 view, else a copy)
    v_repeat: int


def _heads(shape) -> int:
    return shape[-3] if len(shape) >= 3 else 1


def head_plan(q_shape, k_shape, v_shape, enable_gqa: bool) -> HeadPlan | None:
    """The HeadPlan of dense inputs of these shapes; None when the kernels take them as they are (equal
    heads, one key/value head for all, or grouped-query heads with enable_gqa). Raises for heads that
    neither broadcast nor group."""
    hq, hk, hv = _heads(q_shape), _heads(k_shape), _heads(v_shape)
    if hk == hv and (hq == hk or hk == 1 or (enable_gqa and hk and hq % hk == 0)):
        return None
    hkv = math.lcm(hk, hv)
    h = hkv if hq == 1 else hq
    broadcasts = hk in (1, hkv) and hv in (1, hkv) and (h == hkv or hkv == 1)
    groups = enable_gqa and hk and hv and h % hk == 0 and h % hv == 0
    if not (hq and (broadcasts or groups)):
        hint = "; pass enable_gqa=True for grouped-query attention" if (
            not enable_gqa and hk and hv and hq % hk == 0 and hq % hv == 0) else ""
        raise ArgumentError(f"query, key and value have {hq}, {hk} and {hv} heads, which neither broadcast "
                            "(each 1 or the same) nor group (enable_gqa=True with the query heads divisible by "
                            f"the key heads and by the value heads){hint}")
    return HeadPlan(hq=h, hkv=hkv, expand_q=hq == 1 and h > 1, k_repeat=hkv // hk, v_repeat=hkv // hv)


def _with_heads(xp, x, heads: int, repeat: int):
    x3 = x if x.ndim >= 3 else x[None]
    if repeat == 1 and x3.shape[-3] == heads:
        return x
    if x3.shape[-3] == 1:
        return xp.broadcast_to(x3, x3.shape[:-3] + (heads,) + x3.shape[-2:])
    return xp.repeat(x3, repeat, axis=-3)


def broadcast_heads(q, k, v, enable_gqa: bool):
    """(q, k, v, plan): NumPy or CuPy inputs whose heads meet as the kernels take them, and the HeadPlan
    used (None: the inputs themselves); ``sum_head_grads`` brings gradients back to the inputs' shapes."""
    check_flag(enable_gqa, "enable_gqa")
    if not all(getattr(x, "ndim", 0) >= 2 for x in (q, k, v)):
        return q, k, v, None  # not arrays of rank >= 2: from_dense says what is wrong
    plan = head_plan(q.shape, k.shape, v.shape, enable_gqa)
    if plan is None:
        return q, k, v, None
    xp = array_module(q, "query")
    return (_with_heads(xp, q, plan.hq, plan.hq if plan.expand_q else 1), _with_heads(xp, k, plan.hkv, plan.k_repeat),
            _with_heads(xp, v, plan.hkv, plan.v_repeat), plan)


def _summed_heads(g, shape: tuple, repeat: int):
    """Gradient ``g`` of an input of ``shape`` that ``_with_heads`` broadcast or repeated ``repeat`` times."""
    heads = _heads(shape)
    if heads == 1:
        g = g.sum(axis=-3, keepdims=True)
    elif repeat > 1:
        g = g.reshape(g.shape[:-3] + (heads, repeat) + g.shape[-2:]).sum(axis=-3)
    return g.reshape(shape)


def sum_head_grads(plan: HeadPlan | None, grads: tuple, shapes: tuple) -> tuple:
    """(dq, dk, dv, ...) of the inputs ``broadcast_heads`` gave, as gradients of the inputs of ``shapes``."""
    if plan is None:
        return grads
    repeats = (plan.hq if plan.expand_q else 1, plan.k_repeat, plan.v_repeat)
    return tuple(_summed_heads(g, tuple(s), r) if g.shape != tuple(s) else g
                 for g, s, r in zip(grads, shapes, repeats)) + tuple(grads[3:])


def from_dense(q, k, v, attn_mask=None, options: Options = Options(), seed=None, alibi_slopes=None) -> Problem:
    """Validate dense (..., H, L, E) arguments of ``scaled_dot_product_attention`` whose heads meet as the
    kernels take them (``broadcast_heads`` first otherwise)."""
    dropout_p, is_causal, scale, enable_gqa, causal_variant, window, softcap, allow_tf32 = _options(options)
    xp, dtype = _check_arrays(q, k, v)
    for name, x in (("query", q), ("key", k), ("value", v)):
        if x.ndim < 2:
            raise ArgumentError(f"{name}.shape={tuple(x.shape)} has rank {x.ndim}; need (..., L, E) with rank >= 2")
    q3, k3, v3 = (x if x.ndim >= 3 else x[None] for x in (q, k, v))
    (hq, L, E), (hkv, S, Ek), (hv, Sv, Ev) = q3.shape[-3:], k3.shape[-3:], v3.shape[-3:]
    if Ek != E:
        raise ArgumentError(f"query.shape={tuple(q.shape)} and key.shape={tuple(k.shape)} differ in head dim "
                            f"(E={E} vs {Ek}); query and key need the same last dim")
    if Sv != S:
        raise ArgumentError(f"key.shape={tuple(k.shape)} and value.shape={tuple(v.shape)} must agree in length S; "
                            f"got {S} vs {Sv}")
    if head_plan(q.shape, k.shape, v.shape, check_flag(enable_gqa, "enable_gqa")) is not None:
        raise ArgumentError(f"query, key and value have {hq}, {hkv} and {hv} heads: pass them through "
                            "problem.broadcast_heads before building the Problem")
    try:
        batch_shape = tuple(np.broadcast_shapes(q3.shape[:-3], k3.shape[:-3], v3.shape[:-3]))
    except ValueError:
        raise ArgumentError(f"batch dims of query {tuple(q.shape)}, key {tuple(k.shape)} and value "
                            f"{tuple(v.shape)} do not broadcast; make the leading dims equal or 1") from None
    summaries = attn_mask.summaries if isinstance(attn_mask, BlockMask) else None
    mask, mask_kind = _check_mask(attn_mask.mask if summaries is not None else attn_mask, xp,
                                  batch_shape + (hq, L, S), device_of(q))
    slopes = check_alibi(alibi_slopes, xp, batch_shape + (hq,), device_of(q))
    causal, lower_right, window = _check_causal(is_causal, causal_variant, window)
    p, seed, offset = _check_dropout(dropout_p, seed)
    return Problem(xp=xp, q=q, k=k, v=v, batch_shape=batch_shape, hq=hq, hkv=hkv, L=L, S=S, E=E, Ev=Ev,
                   dtype=dtype, scale=_check_scale(scale, E), mask=mask, mask_kind=mask_kind,
                   mask_summaries=summaries, causal=causal,
                   lower_right=lower_right, window=window, dropout_p=p, softcap=_check_softcap(softcap),
                   allow_tf32=check_flag(allow_tf32, "allow_tf32"), alibi_slopes=slopes, seed=seed, offset=offset,
                   out_rank=max(q.ndim, k.ndim, v.ndim))


def _options(options: Options) -> tuple:
    if not isinstance(options, Options):
        raise ArgumentTypeError(f"options={options!r} must be a cusdpa.problem.Options")
    return tuple(getattr(options, name) for name in OPTION_NAMES)


def checked_scalars(is_causal, scale, window, softcap, E: int) -> tuple:
    """(causal, window, scale, softcap) checked and resolved as a Problem resolves them (window None when
    unbounded, scale defaulting to 1/sqrt(E)), for the entry points that build no Problem (the KV cache's
    decode kernels)."""
    causal, _, window = _check_causal(is_causal, "lower_right", window)
    return causal, window, _check_scale(scale, E), _check_softcap(softcap)


def _check_cu_seqlens(cu, name: str, xp, tokens: int, tokens_name: str) -> np.ndarray:
    if array_module(cu, name) is not xp:
        raise ArgumentTypeError(f"{name} is a {type(cu).__module__} array but query is a {xp.__name__} array")
    if _dtype_name(cu) != "int32":
        raise ArgumentTypeError(f"{name}.dtype={cu.dtype} must be int32 (use .astype('int32'))")
    if cu.ndim != 1 or cu.shape[0] < 1:
        raise ArgumentError(f"{name}.shape={tuple(cu.shape)} must be (B + 1,)")
    host = np.asarray(cu if xp is np else cu.get()).astype(np.int64)
    if host[0] != 0:
        raise ArgumentError(f"{name}[0]={host[0]} must be 0")
    if np.any(np.diff(host) < 0):
        raise ArgumentError(f"{name}={host.tolist()} must be non-decreasing")
    if host[-1] != tokens:
        raise ArgumentError(f"{name}[-1]={host[-1]} must equal the token count {tokens_name}={tokens}")
    return host


def from_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, options: Options = Options(),
                seed=None, alibi_slopes=None) -> Problem:
    """Validate packed (total_tokens, H, E) arguments of ``varlen_attention``."""
    dropout_p, is_causal, scale, enable_gqa, causal_variant, window, softcap, allow_tf32 = _options(options)
    xp, dtype = _check_arrays(q, k, v)
    for name, x in (("query", q), ("key", k), ("value", v)):
        if x.ndim != 3:
            raise ArgumentError(f"{name}.shape={tuple(x.shape)} must be (total_tokens, heads, head_dim)")
    (tq, hq, E), (tk, hkv, Ek), (tv, hv, Ev) = q.shape, k.shape, v.shape
    if Ek != E:
        raise ArgumentError(f"query head dim {E} and key head dim {Ek} must be equal")
    if (tv, hv) != (tk, hkv):
        raise ArgumentError(f"key.shape={tuple(k.shape)} and value.shape={tuple(v.shape)} must agree in tokens "
                            "and heads")
    if hq != hkv and (not check_flag(enable_gqa, "enable_gqa") or hkv == 0 or hq % hkv):
        raise ArgumentError(f"query has {hq} heads and key/value {hkv}: pass enable_gqa=True with Hq % Hkv == 0")
    host_q = _check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", xp, tq, "query.shape[0]")
    host_k = _check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", xp, tk, "key.shape[0]")
    if len(host_q) != len(host_k):
        raise ArgumentError(f"cu_seqlens_q has {len(host_q)} entries and cu_seqlens_k {len(host_k)}; both must be "
                            "B + 1")
    lens = {"max_seqlen_q": (max_seqlen_q, int(np.diff(host_q).max(initial=0))),
            "max_seqlen_k": (max_seqlen_k, int(np.diff(host_k).max(initial=0)))}
    for name, (given, actual) in lens.items():
        if isinstance(given, bool) or not isinstance(given, (int, np.integer)) or given < actual:
            raise ArgumentError(f"{name}={given!r} must be an int >= the longest sequence ({actual})")
    causal, lower_right, window = _check_causal(is_causal, causal_variant, window)
    p, seed, offset = _check_dropout(dropout_p, seed)
    varlen = Varlen(cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), host_q, host_k)
    slopes = check_alibi(alibi_slopes, xp, (varlen.batch, hq), device_of(q))
    return Problem(xp=xp, q=q, k=k, v=v, batch_shape=(varlen.batch,), hq=hq, hkv=hkv, L=int(max_seqlen_q),
                   S=int(max_seqlen_k), E=E, Ev=Ev, dtype=dtype, scale=_check_scale(scale, E), causal=causal,
                   lower_right=lower_right, window=window, dropout_p=p, softcap=_check_softcap(softcap),
                   allow_tf32=check_flag(allow_tf32, "allow_tf32"), alibi_slopes=slopes, seed=seed, offset=offset,
                   out_rank=3, varlen=varlen)
