"""Error judgement shared by the tests, ``python -m cusdpa check`` and the bench.

The project's rule: a kernel's error against the float64 reference may be at most a factor times the
error of the same computation done by PyTorch at the same precision (the yardstick,
cusdpa.verify.yardstick), plus a small floor; never a loose fixed tolerance that could hide a bug.
The factor is 2 for the output and lse, 3 for gradients; the floor is ``FLOOR`` of the output's dtype
(``LSE_FLOOR`` for lse; for a float mask's gradient the coarser of the inputs' and the mask's dtype),
relative to max|reference| (``bound``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# The floor of the error rule, relative to max|reference|: the unit roundoff of fp16 and bf16 (their
# output rounding dominates the yardstick anyway); 32 units for fp32, where nothing rounds coarsely and
# the order of summation alone moves fp32 gradients by several units (7 seen on dk, kernel vs torch);
# 32 units for fp64 alike.
FLOOR = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-19, "float64": 2.0**-48}
# lse is float32 whatever the input dtype, so it has one floor of its own.
LSE_FLOOR = 2e-5


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


def max_error(got, ref, where_finite: bool = False) -> float:
    """max |got - ref|, where a NaN/inf mismatch (NaN vs number, inf vs different value) counts as inf.
    ``where_finite``: over the elements where ``ref`` is finite only."""
    got, ref = _same_device(got, ref)
    if got.shape != ref.shape:
        raise ValueError(f"shape {got.shape} vs reference {ref.shape}")
    if got.size == 0:
        return 0.0
    xp = _module(got)
    if where_finite:
        got = xp.where(xp.isfinite(ref), got, ref)
    same_special = (xp.isnan(got) & xp.isnan(ref)) | (xp.isinf(got) & (got == ref))
    bad_special = ~same_special & ~(xp.isfinite(got) & xp.isfinite(ref))
    if bad_special.any():
        return float("inf")
    diff = xp.where(same_special, 0.0, xp.abs(xp.where(same_special, 0, got) - xp.where(same_special, 0, ref)))
    return float(diff.max())


def magnitude(ref) -> float:
    """max |ref| over its finite elements (0 for an empty array)."""
    wide = to_float64(ref)
    xp = _module(wide)
    return float(xp.abs(xp.where(xp.isfinite(wide), wide, 0)).max()) if wide.size else 0.0


@dataclass(frozen=True)
class Bound:
    """The most error one output may have: factor x the yardstick's error + floor x max(max|ref|, 1)."""

    name: str
    factor: float
    yardstick_error: float
    limit: float

    def verdict(self, error: float) -> str | None:
        """None when ``error`` is within the bound, else the message tests and commands print."""
        if not math.isfinite(self.limit):  # would pass anything
            return f"{self.name}: the yardstick is NaN or inf where the reference is finite, so nothing is judged"
        if error <= self.limit:
            return None
        return (f"{self.name}: max error {error:.3g} > {self.factor} x baseline {self.yardstick_error:.3g} + floor "
                f"({self.limit:.3g})")


def coarser(a: str, b: str) -> str:
    """Of two dtypes (FLOOR's keys), the one with the larger floor: the precision a value computed in one and
    stored in the other has at best."""
    return a if FLOOR[a] >= FLOOR[b] else b


def bound(name: str, ref, yardstick, dtype: str) -> Bound:
    """The rule's bound for the output ``name`` (out, lse, dq, dk, dv, dmask) in ``dtype`` (for dmask the
    coarser of the inputs' and the mask's, ``coarser``), given its float64 reference and the yardstick's
    value."""
    factor = 2.0 if name in ("out", "lse") else 3.0
    floor = LSE_FLOOR if name == "lse" else FLOOR[dtype]
    # Where NaN/inf inputs make the reference NaN or inf, an output must match it exactly (max_error); the
    # yardstick, computed on q, k, v with non-finite values zeroed, sizes the error where it is finite.
    base = max_error(yardstick, ref, where_finite=True)
    return Bound(name, factor, base, factor * base + floor * max(magnitude(ref), 1.0))
