"""Host side: present a problem's arrays to the kernels, and launch them on the caller's stream.

Every rows-of-vectors operand becomes a 6-D view (B0, B1, B2, H, rows, dim) and every per-row
scalar a 5-D view, over the caller's memory: the problem's batch dims are merged where every
operand allows it (adjacent dims that are both broadcast, or both full with compatible strides;
dims of size 1 dropped) into at most three, and broadcast dims get stride 0. Nothing is copied, so
a mask broadcast over batch and heads costs its own size, as the contract demands.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from numba import cuda

from .device import SIMULATOR

MAX_BATCH_DIMS = 3


@dataclass(frozen=True)
class BatchPlan:
    """How the problem's batch dims map onto the kernels' three: ``groups`` of original dims."""

    nb: int  # number of batch dims of the problem
    full: tuple  # problem batch shape
    groups: tuple  # up to three tuples of original dims, outermost first

    @functools.cached_property
    def shape3(self) -> tuple:
        sizes = tuple(math.prod(self.full[d] for d in g) for g in self.groups)
        return (1,) * (MAX_BATCH_DIMS - len(sizes)) + sizes

    def own3(self, x, tail: int = 3) -> tuple:
        """The merged batch sizes of operand ``x`` itself: the full size, or 1 where it is broadcast."""
        sizes, _ = _padded(x.shape, x.strides, x.itemsize, self.nb, tail)
        own = tuple(self.shape3[MAX_BATCH_DIMS - len(self.groups) + n] if sizes[g[0]] != 1 else 1
                    for n, g in enumerate(self.groups))
        return (1,) * (MAX_BATCH_DIMS - len(own)) + own


def _padded(shape, strides, itemsize: int, nb: int, tail: int):
    """(sizes, element strides) of the batch dims of an array of this shape and these byte strides, left-padded
    with broadcast dims to nb."""
    lead = max(0, len(shape) - tail)
    return (1,) * (nb - lead) + tuple(shape[:lead]), (0,) * (nb - lead) + tuple(s // itemsize for s in strides[:lead])


def batch_plan(full: tuple, operands) -> BatchPlan | str:
    """Merge the batch dims of ``full`` for ``operands`` (pairs (array, tail rank)); a reason if > 3 remain."""
    nb = len(full)
    infos = [_padded(x.shape, x.strides, x.itemsize, nb, tail) for x, tail in operands]
    groups: list[list[int]] = []
    for d in (d for d in range(nb) if full[d] != 1):
        if groups and all(_mergeable(sizes, strides, full, groups[-1][-1], d) for sizes, strides in infos):
            groups[-1].append(d)
        else:
            groups.append([d])
    if len(groups) > MAX_BATCH_DIMS:
        return (f"batch dims {full} leave {len(groups)} dims after merging the ones the strides allow; the "
                f"kernels index {MAX_BATCH_DIMS} (make the inputs contiguous)")
    return BatchPlan(nb, tuple(full), tuple(tuple(g) for g in groups))


def _mergeable(sizes, strides, full, a: int, b: int) -> bool:
    if sizes[a] == 1 and sizes[b] == 1:
        return True
    return sizes[a] == full[a] and sizes[b] == full[b] and strides[a] == strides[b] * full[b]


def as_strided(xp, x, shape, strides):
    """A view of x's memory with this shape and these byte strides."""
    if xp is np:
        return np.lib.stride_tricks.as_strided(x, shape=shape, strides=strides)
    import cupy

    return cupy.lib.stride_tricks.as_strided(x, shape=shape, strides=strides)


def dense_view(xp, plan: BatchPlan, x, tail_full: tuple):
    """x (..., *tail) as (B0, B1, B2, *tail_full) with zero strides where x is broadcast."""
    return as_strided(xp, x, *_view_geometry(plan, tuple(x.shape), tuple(x.strides), x.itemsize, tuple(tail_full)))


@functools.lru_cache(maxsize=4096)  # bounded: shapes change call to call in inference
def _view_geometry(plan: BatchPlan, shape: tuple, strides: tuple, itemsize: int, tail_full: tuple) -> tuple:
    """(shape, byte strides) of dense_view's view of an array of this shape and these byte strides: the same for
    every call of one signature, so worked out once."""
    ndim, tail = len(shape), len(tail_full)
    sizes, elem_strides = _padded(shape, strides, itemsize, plan.nb, tail)
    batch_strides = [0 if sizes[g[0]] == 1 else elem_strides[g[-1]] for g in plan.groups]
    batch_strides = [0] * (MAX_BATCH_DIMS - len(batch_strides)) + batch_strides
    tail_sizes = shape[ndim - tail:] if ndim >= tail else (1,) * (tail - ndim) + shape
    tail_strides = [s // itemsize for s in strides[ndim - tail:]] if ndim >= tail else \
        [0] * (tail - ndim) + [s // itemsize for s in strides]
    tail_strides = [0 if n == 1 and f != 1 else s for n, f, s in zip(tail_sizes, tail_full, tail_strides)]
    return plan.shape3 + tail_full, tuple(int(s) * itemsize for s in batch_strides + tail_strides)


@functools.cache
def dtype_name(dtype) -> str:
    """``dtype.name``, remembered per dtype: NumPy composes the name on every read (a few microseconds, a
    dozen reads a call)."""
    return np.dtype(dtype).name


def bits(x):
    """bf16 reaches Numba as its uint16 bits (Numba has no bf16 type); other dtypes pass as they are."""
    return x.view(np.uint16) if dtype_name(x.dtype) == "bfloat16" else x


def kernel_array(x):
    """An array argument for a Numba launch: no copy, no synchronisation.

    GPU: anything exporting __cuda_array_interface__ (CuPy) or __dlpack__ (through CuPy), wrapped
    with sync=False so Numba does not synchronise the exporter's stream. Simulator: NumPy arrays are
    wrapped directly, since its own argument path only takes contiguous arrays and copies them.
    """
    if SIMULATOR:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        return FakeCUDAArray(x)
    if not hasattr(x, "__cuda_array_interface__"):
        import cupy

        x = cupy.from_dlpack(x)
    return cuda.as_cuda_array(x, sync=False)


_placeholders: dict = {}


def placeholder(xp, shape: tuple, dtype):
    """A zeroed array standing in for an operand a kernel does not read (no mask, no cu_seqlens), made once
    per device, shape and dtype rather than on every call (an allocation and a fill kernel each)."""
    key = (xp.__name__, 0 if xp is np else xp.cuda.Device().id, shape, np.dtype(dtype))
    held = _placeholders.get(key)
    if held is None:
        held = _placeholders[key] = xp.zeros(shape, dtype=dtype)
    return held


def device_of(x) -> int:
    return 0 if SIMULATOR else x.device.id


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
