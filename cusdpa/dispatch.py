"""Backends, what each supports (as data), and dispatch by priority list.

Each backend module exposes an ``IMPL`` with a ``Capabilities`` record, ``environment_reasons``
(what this machine or these arrays lack) and ``forward`` / ``backward``. Dispatch takes the first
enabled backend with no reasons; ``sdpa_kernel`` restricts or reorders the list like
``torch.nn.attention.sdpa_kernel``; tests skip on the same reasons.
"""
from __future__ import annotations

import contextlib
import contextvars
import enum
import importlib
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from . import problem
from .errors import ArgumentTypeError


class Backend(enum.Enum):
    FLASH = "flash"
    EFFICIENT = "efficient"
    MATH = "math"


DEFAULT_PRIORITY = (Backend.FLASH, Backend.EFFICIENT, Backend.MATH)
_MODULES = {Backend.FLASH: "cusdpa.backends.flash", Backend.EFFICIENT: "cusdpa.backends.efficient",
            Backend.MATH: "cusdpa.backends.math"}

class _Enabled(tuple):
    """The enabled backends in priority order, with their names as one string: a plan's signature takes the
    string, whose hash Python keeps (an Enum member's hash is computed in Python on every call)."""

    key: str

    def __new__(cls, order):
        self = super().__new__(cls, order)
        self.key = ",".join(b.value for b in order)
        return self


_enabled: contextvars.ContextVar[_Enabled] = contextvars.ContextVar("cusdpa_backends",
                                                                     default=_Enabled(DEFAULT_PRIORITY))


@dataclass(frozen=True)
class Capabilities:
    """What a backend computes, independent of the machine it runs on."""

    arrays: frozenset = frozenset({"numpy", "cupy"})
    dtypes: frozenset = frozenset(problem.SUPPORTED_DTYPES)
    max_head_dim: int | None = None  # E and Ev
    head_dim_multiple: int = 1
    zero_head_dim: bool = True  # E = 0 or Ev = 0 (PyTorch takes them; a tiled kernel has no tile to load)
    mask_kinds: frozenset = frozenset({"bool", "float"})
    mask_grad: bool = True  # a float attn_mask's gradient
    dropout: bool = True
    gqa: bool = True
    varlen: bool = True
    window: bool = True
    lower_right: bool = True
    softcap: bool = True  # logit soft-capping
    alibi: bool = True  # ALiBi slopes
    unit_stride: bool = False  # needs the last dim of q, k, v contiguous

    def reasons(self, pr: problem.Problem, need_grad: bool, mask_grad: bool | None = None) -> list[str]:
        """Why this backend cannot run ``pr`` (nothing: it can), for a forward or, with ``need_grad``, a
        backward too, and the float attn_mask's gradient where ``mask_grad`` (default: ``need_grad``)."""
        mask_grad = need_grad if mask_grad is None else mask_grad
        out = []
        kind = "numpy" if pr.xp.__name__ == "numpy" else "cupy"
        if kind not in self.arrays:
            out.append(f"takes {' or '.join(sorted(self.arrays))} arrays, got {kind} arrays")
        if pr.dtype_name not in self.dtypes:
            out.append(f"dtype {pr.dtype_name} not supported (supports {', '.join(sorted(self.dtypes))})")
        for name, d in (("E", pr.E), ("Ev", pr.Ev)):
            if d == 0 and not self.zero_head_dim:
                out.append(f"head dim {name}=0 not supported")
            elif self.max_head_dim is not None and d > self.max_head_dim:
                out.append(f"head dim {name}={d} > {self.max_head_dim}")
            elif d % self.head_dim_multiple:
                out.append(f"head dim {name}={d} is not a multiple of {self.head_dim_multiple}")
        if pr.mask_kind is not None and pr.mask_kind not in self.mask_kinds:
            out.append(f"{pr.mask_kind} attn_mask not supported")
        if pr.mask_kind == "float" and need_grad and mask_grad and not self.mask_grad:
            out.append("no gradient for a float attn_mask")
        if pr.dropout_p > 0 and not self.dropout:
            out.append("dropout not supported")
        if pr.hq != pr.hkv and not self.gqa:
            out.append("grouped-query attention (Hq != Hkv) not supported")
        if pr.varlen is not None and not self.varlen:
            out.append("variable-length batches not supported")
        if pr.window is not None and not self.window:
            out.append("sliding window not supported")
        if pr.lower_right and not self.lower_right:
            out.append("lower-right causal alignment not supported")
        if pr.softcap and not self.softcap:
            out.append("logit soft-capping (softcap) not supported yet")
        if pr.alibi_slopes is not None and not self.alibi:
            out.append("ALiBi (alibi_slopes) not supported yet")
        if self.unit_stride:
            for name, x in (("query", pr.q), ("key", pr.k), ("value", pr.v)):
                if x.shape[-1] > 1 and x.strides[-1] != x.itemsize:
                    out.append(f"{name} has last-dim stride {x.strides[-1] // x.itemsize} elements, needs 1 "
                               "(call .copy() or ascontiguousarray)")
        return out


@dataclass(frozen=True)
class Implementation:
    backend: Backend
    capabilities: Capabilities
    environment_reasons: Callable  # (Problem | None) -> list[str]: what the machine or arrays lack
    # forward(pr, out=None, lse=None) -> (out, lse). Given ``out``/``lse`` (arrays of pr.xp with
    # pr.out_shape / pr.lse_shape, dtypes pr.dtype / float32, e.g. views of torch-allocated memory),
    # the results are written into them. Kernels run on CuPy's current stream.
    forward: Callable
    # backward(pr, out, lse, dout, deterministic=False, grads=None) -> (dq, dk, dv[, dmask]);
    # ``grads`` likewise receives the results when given.
    backward: Callable
    # (Problem, mask_grad) -> list[str]: what this problem's backward lacks here beyond the Capabilities (a
    # float attn_mask's gradient where ``mask_grad``, which FLASH computes on some kernels only)
    backward_reasons: Callable | None = None

    def not_supported_reasons(self, pr: problem.Problem, need_grad: bool = False,
                              mask_grad: bool | None = None) -> list[str]:
        reasons = self.environment_reasons(pr) + self.capabilities.reasons(pr, need_grad, mask_grad)
        if need_grad and self.backward_reasons is not None:
            reasons += self.backward_reasons(pr, need_grad if mask_grad is None else mask_grad)
        return reasons


def implementation(backend: Backend) -> Implementation:
    return importlib.import_module(_MODULES[backend]).IMPL


def enabled_backends() -> tuple[Backend, ...]:
    return _enabled.get()


def enabled_key() -> str:
    """The enabled backends as one string ("flash,efficient,math"): what a cache key should hold."""
    return _enabled.get().key


def kernel_config_key():
    """The EFFICIENT kernels' configuration in force (``kernels_numba.current()``, a frozen dataclass), or None
    while kernels_numba is not imported: part of a plan's signature, since it decides which kernels run."""
    config = sys.modules.get("kernels_numba.config")
    return None if config is None else config.current()


@contextlib.contextmanager
def sdpa_kernel(backends: Backend | Sequence[Backend], set_priority: bool = False):
    """Run the body with only ``backends`` enabled.

    With ``set_priority=True`` they are tried in the given order; otherwise in the default order
    FLASH, EFFICIENT, MATH (as ``torch.nn.attention.sdpa_kernel``).
    """
    chosen = [backends] if isinstance(backends, Backend) else list(backends)
    for b in chosen:
        if not isinstance(b, Backend):
            raise ArgumentTypeError(f"sdpa_kernel takes cusdpa.Backend members, got {b!r}")
    order = tuple(dict.fromkeys(chosen)) if set_priority else tuple(b for b in DEFAULT_PRIORITY if b in chosen)
    token = _enabled.set(_Enabled(order))
    try:
        yield
    finally:
        _enabled.reset(token)


@dataclass(frozen=True)
class Explanation:
    """Which backend dispatch would pick, and why each other one would not run."""

    chosen: Backend | None
    reasons: dict  # Backend -> list[str]; empty list = would run

    def __str__(self) -> str:
        lines = [f"chosen: {self.chosen.name if self.chosen else 'none'}"]
        for b, r in self.reasons.items():
            lines.append(f"  {b.name}: " + ("available" if not r else "; ".join(r)))
        return "\n".join(lines)


def explain_problem(pr: problem.Problem, need_grad: bool = False, mask_grad: bool | None = None) -> Explanation:
    enabled = enabled_backends()
    reasons, chosen = {}, None
    for b in DEFAULT_PRIORITY:
        r = implementation(b).not_supported_reasons(pr, need_grad, mask_grad)
        if b not in enabled:
            r = ["disabled by sdpa_kernel"] + r
        reasons[b] = r
    for b in enabled:
        if not reasons[b]:
            chosen = b
            break
    return Explanation(chosen, reasons)


def select(pr: problem.Problem, need_grad: bool = False, mask_grad: bool | None = None) -> Implementation:
    """The first enabled backend that takes this problem (with ``need_grad``, its backward too, and a float
    attn_mask's gradient where ``mask_grad``, default ``need_grad``); else one error listing every reason."""
    for b in enabled_backends():
        impl = implementation(b)
        if not impl.not_supported_reasons(pr, need_grad, mask_grad):
            return impl
    raise NotImplementedError("no cusdpa backend can run these inputs:\n" +
                              str(explain_problem(pr, need_grad, mask_grad)))
