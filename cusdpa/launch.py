"""A kernel launch prepared once and issued many times, straight through ``cuLaunchKernel``.

A ``Launch`` holds a compiled function, its grid, block and shared memory, and every argument already
encoded, except named ``Slot``s (device pointers, the dropout seed) that each call fills in. The general
path fills the slots with CuPy arrays; a cached plan (``flash.plan``) fills them with raw pointers of
torch tensors, so a repeated call costs a buffer copy and one driver call instead of building CuPy views
and converting some forty arguments every time.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Slot(NamedTuple):
    """An argument filled in per call, by name."""

    name: str


def _cell(value) -> int:
    """A kernel argument as the 8-byte cell that holds it: device pointers (CuPy arrays, ints) as
    addresses, NumPy scalars by their bytes, little-endian in the cell's low bytes (4-byte int and
    float parameters read only those)."""
    data = getattr(value, "data", None)
    if data is not None and hasattr(data, "ptr"):  # a CuPy array
        return data.ptr
    if isinstance(value, int):  # Python ints only: NumPy scalars keep their width below
        return value
    raw = np.asarray(value).tobytes()
    if len(raw) > 8:
        raise TypeError(f"kernel argument {value!r} of {len(raw)} bytes does not fit a parameter cell")
    return int.from_bytes(raw, "little")


class Launch:
    """One kernel launch; ``launch(values, stream_ptr)`` fills the slots from ``values`` and issues it."""

    __slots__ = ("fn", "grid", "block", "smem", "cells", "offsets", "slots")

    def __init__(self, fn, grid: tuple, block: tuple, smem: int, args):
        self.fn, self.grid, self.block, self.smem = fn, grid, block, smem
        self.slots = tuple((i, a.name) for i, a in enumerate(args) if isinstance(a, Slot))
        self.cells = np.array([0 if isinstance(a, Slot) else _cell(a) for a in args], dtype=np.uint64)
        # cuLaunchKernel takes an array of pointers, one per argument: cell i sits 8 i bytes into the buffer
        self.offsets = np.arange(len(args), dtype=np.uint64) * np.uint64(8)

    def __call__(self, values: dict, stream_ptr: int) -> None:
        """Launch on the runtime's current device (whose function ``fn`` must be) and ``stream_ptr``."""
        from cupy.cuda import driver, runtime

        if driver.ctxGetCurrent() == 0:
            # A thread can have a current device but no current context: torch's autograd threads select
            # the device lazily, and a kernel as the first CUDA work of a backward then failed with
            # CUDA_ERROR_INVALID_CONTEXT. cudaSetDevice makes the device's primary context current.
            runtime.setDevice(runtime.getDevice())
        cells = self.cells.copy()  # per call: concurrent launches from other threads never share a buffer
        for i, name in self.slots:
            value = values[name]
            cells[i] = value if type(value) is int else _cell(value)  # raw pointers and seeds are ints
        params = self.offsets + np.uint64(cells.ctypes.data)
        gx, gy = self.grid
        driver.launchKernel(self.fn.ptr, gx, gy, 1, self.block[0], 1, 1, self.smem, stream_ptr, params.ctypes.data, 0)
