"""Error judgement shared by the tests and ``python -m cusdpa check``.

DESIGN.md's rule: a kernel's error against the float64 reference may be at most ``factor`` times the
error of the same computation done by PyTorch (or another trusted path) at the same precision, plus
a small floor; never a loose fixed tolerance that could hide a bug.
"""
from __future__ import annotations

import numpy as np


def to_float64(x) -> np.ndarray:
    """Host float64 copy of a NumPy/CuPy array (bf16 included)."""
    if not isinstance(x, np.ndarray):
        x = x.get()
    return np.asarray(x).astype(np.float64)


def max_error(got, ref) -> float:
    """max |got - ref|, where a NaN/inf mismatch (NaN vs number, inf vs different value) counts as inf."""
    got, ref = to_float64(got), to_float64(ref)
    if got.shape != ref.shape:
        raise ValueError(f"shape {got.shape} vs reference {ref.shape}")
    if got.size == 0:
        return 0.0
    same_special = (np.isnan(got) & np.isnan(ref)) | (np.isinf(got) & (got == ref))
    bad_special = ~same_special & ~(np.isfinite(got) & np.isfinite(ref))
    if bad_special.any():
        return float("inf")
    diff = np.where(same_special, 0.0, np.abs(np.where(same_special, 0, got) - np.where(same_special, 0, ref)))
    return float(diff.max())


def judge(name: str, got, ref, baseline, factor: float = 2.0, floor: float = 1e-5) -> str | None:
    """None when max_error(got, ref) <= factor * max_error(baseline, ref) + floor * max|ref|, else a message."""
    err, base = max_error(got, ref), max_error(baseline, ref)
    scale = float(np.nanmax(np.abs(np.where(np.isfinite(to_float64(ref)), to_float64(ref), 0)), initial=1.0))
    limit = factor * base + floor * max(scale, 1.0)
    if err <= limit:
        return None
    return f"{name}: max error {err:.3g} > {factor} x baseline {base:.3g} + floor ({limit:.3g})"
