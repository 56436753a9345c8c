"""MATH: the unfused computation. The NumPy reference for NumPy arrays; on CuPy arrays the same code
runs as cuBLAS matmuls and elementwise masked softmax with fp32 accumulation (fp64 for fp64 inputs)."""
from __future__ import annotations

from .. import reference
from ..dispatch import Backend, Capabilities, Implementation


def deliver(xp, results, into):
    """Copy ``results`` into caller-provided arrays ``into`` (None: return the results as they are)."""
    if into is None:
        return tuple(results)
    for dst, src in zip(into, results):
        xp.copyto(dst, src.astype(dst.dtype, copy=False))
    return tuple(into)


def _environment_reasons(pr):
    return []


def _forward(pr, out=None, lse=None):
    return deliver(pr.xp, reference.forward(pr), None if out is None else (out, lse))


def _backward(pr, out, lse, dout, deterministic=False, grads=None):
    # Fixed chunk order and library reductions: the same result run to run, deterministic or not. The
    # forward's out and lse are used as the kernels use them (reference.backward).
    return deliver(pr.xp, reference.backward(pr, dout, out=out, lse=lse), grads)


IMPL = Implementation(
    backend=Backend.MATH,
    capabilities=Capabilities(),
    environment_reasons=_environment_reasons,
    forward=_forward,
    backward=_backward,
)
