"""Error judgement shared by the tests and ``python -m cusdpa check``.

DESIGN.md's rule: a kernel's error against the float64 reference may be at most ``factor`` times the
error of the same computation done by PyTorch (or another trusted path) at the same precision, plus
a small floor; never a loose fixed tolerance that could hide a bug.
"""
from __future__ import annotations

import numpy as np


def to_float64(x):
    """float64 copy of a NumPy/CuPy array (bf16 included), on the array's own device: a GPU array stays
    there, because judging tens of millions of elements on the host takes seconds per array."""
    if isinstance(x, np.ndarray):
        return x.astype(np.float64, copy=False)
    if x.dtype.name == "bfloat16":  # bf16 is the top half of a float32; integer ops work in every CuPy
        import cupy

        return (x.view(cupy.uint16).astype(cupy.uint32) << 16).view(cupy.float32).astype(cupy.float64)
    return x.astype(np.float64, copy=False)


def _module(x):
    """NumPy or CuPy, whichever ``x`` belongs to."""
    if isinstance(x, np.ndarray):
        return np
    import cupy

    return cupy


def _same_device(got, ref):
    got, ref = to_float64(got), to_float64(ref)
    if type(got) is not type(ref):  # one of them is on the host: compare there
        got, ref = (x if isinstance(x, np.ndarray) else x.get() for x in (got, ref))
    return got, ref


def max_error(got, ref) -> float:
    """max |got - ref|, where a NaN/inf mismatch (NaN vs number, inf vs different value) counts as inf."""
    got, ref = _same_device(got, ref)
    if got.shape != ref.shape:
        raise ValueError(f"shape {got.shape} vs reference {ref.shape}")
    if got.size == 0:
        return 0.0
    xp = _module(got)
    same_special = (xp.isnan(got) & xp.isnan(ref)) | (xp.isinf(got) & (got == ref))
    bad_special = ~same_special & ~(xp.isfinite(got) & xp.isfinite(ref))
    if bad_special.any():
        return float("inf")
    diff = xp.where(same_special, 0.0, xp.abs(xp.where(same_special, 0, got) - xp.where(same_special, 0, ref)))
    return float(diff.max())


def judge(name: str, got, ref, baseline, factor: float = 2.0, floor: float = 1e-5) -> str | None:
    """None when max_error(got, ref) <= factor * max_error(baseline, ref) + floor * max|ref|, else a message."""
    err, base = max_error(got, ref), max_error(baseline, ref)
    wide = to_float64(ref)
    xp = _module(wide)
    scale = float(xp.abs(xp.where(xp.isfinite(wide), wide, 0)).max()) if wide.size else 0.0
    limit = factor * base + floor * max(scale, 1.0)
    if err <= limit:
        return None
    return f"{name}: max error {err:.3g} > {factor} x baseline {base:.3g} + floor ({limit:.3g})"
