"""Torch tensors as NumPy / CuPy arrays without copies, and the CuPy device and stream to launch on.

CPU tensors become NumPy views (``Tensor.numpy``). CUDA tensors become CuPy views of their memory
built from what a DLPack capsule carries (pointer, shape, strides, dtype, device) with the tensor as
the owner that keeps the memory alive. ``cupy.from_dlpack`` does the same but runs
``Tensor.__dlpack__``'s stream bookkeeping on every call, measured at about 70 us per tensor on the
H100, five tensors per attention call; ``__cuda_array_interface__`` would make CuPy synchronise the
producer's stream on the host. Stream order is kept instead by launching on torch's current stream
(``on_stream``), so the hot path neither copies nor waits.
"""
from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch

from cusdpa.errors import ArgumentError

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_device(t: torch.Tensor, name: str) -> None:
    if t.device.type not in ("cpu", "cuda"):
        raise ArgumentError(f"{name} is on {t.device}; cusdpa runs CPU tensors (on the reference) and CUDA tensors, "
                            "move it with .cpu() or .cuda()")


@functools.cache
def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    if dtype == torch.bfloat16:  # NumPy has no bf16; ml_dtypes' is the one NumPy and CuPy share
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return torch.empty(0, dtype=dtype).numpy().dtype


def as_array(t: torch.Tensor):
    """A NumPy (CPU) or CuPy (CUDA) array sharing ``t``'s memory, strides included."""
    t = t.detach()
    if t.device.type == "cpu":
        if t.dtype == torch.bfloat16:  # reinterpret the bits as ml_dtypes.bfloat16
            return t.view(torch.int16).numpy().view(_numpy_dtype(torch.bfloat16))
        return t.numpy()
    check_device(t, "tensor")
    return _cupy_view(t)


def _cupy_view(t: torch.Tensor):
    import cupy

    item = t.element_size()
    # bytes from the first to one past the last element the view can reach
    extent = 0 if t.numel() == 0 else (sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1) * item
    memory = cupy.cuda.UnownedMemory(t.data_ptr(), extent, t, t.device.index)
    return cupy.ndarray(tuple(t.shape), _numpy_dtype(t.dtype), cupy.cuda.MemoryPointer(memory, 0),
                        tuple(s * item for s in t.stride()))


class _TorchStream:
    """A raw stream handle in the CUDA stream protocol, which ``cupy.cuda.Stream.from_external`` takes
    (CuPy 14 deprecates ``ExternalStream``); torch's own Stream has the protocol only in recent releases."""

    __slots__ = ("handle",)

    def __init__(self, handle: int):
        self.handle = handle

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.handle)


@contextlib.contextmanager
def on_stream(device: torch.device):
    """Run the body with CuPy on ``device`` and on torch's current stream there (no-op on the CPU)."""
    if device.type != "cuda":
        yield
        return
    import cupy

    with cupy.cuda.Device(device.index):
        # the raw handle: what inductor's generated code reads, without building a torch.cuda.Stream
        current = _TorchStream(torch._C._cuda_getCurrentRawStream(device.index))
        with cupy.cuda.Stream.from_external(current):
            yield
