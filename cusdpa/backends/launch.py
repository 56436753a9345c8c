"""A kernel launch prepared once and issued many times, straight through ``cuLaunchKernel``.

A ``Launch`` holds a compiled function, its grid, block and shared memory, and every argument already
encoded, except named ``Slot``s (device pointers, the dropout seed) that each call fills in. The general
path fills the slots with CuPy arrays; a plan (``backends.plans``) fills them with raw pointers, so
a repeated call costs a few stores into a parameter buffer and one driver call instead of building CuPy
views and converting some forty arguments every time.

Slot values travel as one tuple in the order of ``SLOTS`` (``values(q=..., ...)`` builds it by name): a
launch knows where each of its slots sits in that tuple, so a call does no dictionary work. A plan's launches
may include a ``ZeroWords``, a memset of one slot's words issued in the same order.
"""
from __future__ import annotations

import ctypes
import threading
from typing import NamedTuple

import numpy as np

# Every slot name any kernel takes, in the order of the value tuples.
SLOTS = ("q", "k", "v", "o", "lse", "do", "delta", "dq", "dk", "dv", "seed_lo", "seed_hi", "offset", "dq_accum",
         "mask", "seen", "blocks", "table", "seqlens", "slopes", "o_part", "ml_part", "key", "value", "fixed_len",
         "dmask", "arrivals")
_POSITION = {name: n for n, name in enumerate(SLOTS)}


class Slot(NamedTuple):
    """An argument filled in per call, by name (one of ``SLOTS``)."""

    name: str


class MapSlot(NamedTuple):
    """A TMA tensor map argument (128 bytes, passed by value) of the tensor a slot names: ``tensor_map``
    (``backends.flash.tma.TensorMap``) gives the map's bytes for any address, and where the address sits in
    them (``offset``, or None: each call encodes its map afresh)."""

    name: str
    tensor_map: object


def values(**named) -> tuple:
    """The value tuple of a call: ``named`` slots in place, None elsewhere."""
    out = [None] * len(SLOTS)
    for name, value in named.items():
        out[_POSITION[name]] = value
    return tuple(out)


def seed_values(seed: int, offset: int = 0) -> dict:
    """The dropout slots' values: Philox key words and counter offset (ints: a launch cell holds either)."""
    return {"seed_lo": seed & 0xFFFFFFFF, "seed_hi": seed >> 32, "offset": offset}


def _cell(value) -> int:
    """A kernel argument as the 8-byte cell that holds it: device pointers (CuPy arrays, ints) as
    addresses, NumPy scalars by their bytes, little-endian in the cell's low bytes (4-byte int and
    float parameters read only those)."""
    data = getattr(value, "data", None)
    if data is not None and hasattr(data, "ptr"):  # a CuPy array
        return data.ptr
    if isinstance(value, int):  # Python ints only: NumPy scalars keep their width below
        return value & 0xFFFF_FFFF_FFFF_FFFF
    raw = np.asarray(value).tobytes()
    if len(raw) > 8:
        raise TypeError(f"kernel argument {value!r} of {len(raw)} bytes does not fit a parameter cell")
    return int.from_bytes(raw, "little")


class _Driver:
    """CuPy's driver and runtime modules, imported at the first launch (``import cusdpa`` needs no CuPy)."""

    driver = runtime = None

    @classmethod
    def load(cls):
        from cupy.cuda import driver, runtime

        cls.driver, cls.runtime = driver, runtime
        return cls


class Launch:
    """One kernel launch; ``launch(values, stream_ptr)`` fills the slots from the value tuple and issues it on
    the current device, which must be the one ``fn`` was loaded on (``run`` sees to that)."""

    __slots__ = ("fn", "grid", "block", "smem", "cells", "slots", "maps", "arrays", "_buffers")

    def __init__(self, fn, grid: tuple, block: tuple, smem: int, args):
        self.fn, self.grid, self.block, self.smem = fn, grid, block, smem
        # (cell index, position in the value tuple) of each slot; a map's cell is unused, its bytes live in
        # 16 words of their own: (cell index, position, TensorMap)
        self.slots = tuple((i, _POSITION[a.name]) for i, a in enumerate(args) if isinstance(a, Slot))
        self.maps = tuple((i, _POSITION[a.name], a.tensor_map) for i, a in enumerate(args) if isinstance(a, MapSlot))
        self.cells = tuple(0 if isinstance(a, (Slot, MapSlot)) else _cell(a) for a in args)
        # the CuPy arrays given as arguments (a cell holds only the address): alive while the launch is
        self.arrays = tuple(a for a in args if hasattr(getattr(a, "data", None), "ptr"))
        self._buffers: dict = {}  # thread id -> (words, stores, fresh maps, pointer array, its address)

    def _new_buffer(self) -> tuple:
        # One parameter buffer per thread, made at its first call: the driver copies the parameters during the
        # call, so the buffer may be refilled right after, and threads launching the same kernel never share
        # one. The cells, then each map's 16 words, in one array, so that a call's every store (a slot's cell,
        # a map's address word) is one item assignment of one loop.
        n = max(1, len(self.cells))
        words = (ctypes.c_uint64 * (n + 16 * len(self.maps)))(*self.cells)
        base = ctypes.addressof(words)
        addresses = [base + 8 * i for i in range(n)]
        stores, fresh = list(self.slots), []  # fresh: (map's address, position, TensorMap)
        for m, (i, j, tensor_map) in enumerate(self.maps):
            first = n + 16 * m
            addresses[i] = base + 8 * first
            ctypes.memmove(addresses[i], tensor_map.template, len(tensor_map.template))
            if tensor_map.offset is None:
                fresh.append((addresses[i], j, tensor_map))
            else:
                stores.append((first + tensor_map.offset // 8, j))
        pointers = (ctypes.c_void_p * n)(*addresses)
        buf = self._buffers[threading.get_ident()] = (words, tuple(stores), tuple(fresh), pointers,
                                                      ctypes.addressof(pointers))
        return buf

    def __call__(self, values: tuple, stream_ptr: int) -> None:
        words, stores, fresh, _, params = self._buffers.get(threading.get_ident()) or self._new_buffer()
        for i, j in stores:
            value = values[j]
            words[i] = value if type(value) is int else _cell(value)  # raw pointers and seeds are ints
        for dst, j, tensor_map in fresh:
            value = values[j]
            tensor_map.write(dst, value if type(value) is int else _cell(value))
        gx, gy = self.grid
        (_Driver.driver or _Driver.load().driver).launchKernel(self.fn.ptr, gx, gy, 1, self.block[0], 1, 1, self.smem,
                                                               stream_ptr, params, 0)


class ZeroWords:
    """A prepared memset in a plan's launches: ``words`` int32 at slot ``slot`` zeroed on the call's stream
    (cudaMemsetAsync: a memset node when a CUDA graph captures the call)."""

    __slots__ = ("slot", "nbytes")

    def __init__(self, slot: str, words: int):
        self.slot, self.nbytes = _POSITION[slot], 4 * words

    def __call__(self, values: tuple, stream_ptr: int) -> None:
        (_Driver.runtime or _Driver.load().runtime).memsetAsync(values[self.slot], 0, self.nbytes, stream_ptr)

    def __repr__(self) -> str:
        return f"ZeroWords({SLOTS[self.slot]!r}, {self.nbytes // 4})"


def run(launches, values: tuple, stream_ptr: int, device: int) -> None:
    """Issue ``launches`` in order on ``device`` and ``stream_ptr``, restoring the caller's device after."""
    cuda = _Driver if _Driver.runtime is not None else _Driver.load()
    current = cuda.runtime.getDevice()
    if current == device and cuda.driver.ctxGetCurrent() != 0:
        for prepared in launches:
            prepared(values, stream_ptr)
        return
    # A thread can have a current device but no current context: torch's autograd threads select the device
    # lazily, and a kernel as the first CUDA work of a backward then failed with CUDA_ERROR_INVALID_CONTEXT.
    # cudaSetDevice makes the device's primary context current.
    cuda.runtime.setDevice(device)
    try:
        for prepared in launches:
            prepared(values, stream_ptr)
    finally:
        if current != device:
            cuda.runtime.setDevice(current)
