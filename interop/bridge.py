"""Torch tensors as NumPy / CuPy arrays without copies, and the CuPy device and stream to launch on.

CPU tensors become NumPy views (``Tensor.numpy``), CUDA tensors CuPy views through DLPack. DLPack,
not ``__cuda_array_interface__``: CuPy synchronises the producer's stream on the host when it
imports through the array interface, and the hot path must never wait on the host.
"""
from __future__ import annotations

import contextlib
import functools

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_device(t: torch.Tensor, name: str) -> None:
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} is on {t.device}; cusdpa runs CPU tensors (on the reference) and CUDA tensors, "
                         "move it with .cpu() or .cuda()")


def as_array(t: torch.Tensor):
    """A NumPy (CPU) or CuPy (CUDA) array sharing ``t``'s memory, strides included."""
    t = t.detach()
    if t.device.type == "cpu":
        if t.dtype == torch.bfloat16:  # NumPy has no bf16: reinterpret the bits as ml_dtypes.bfloat16
            import ml_dtypes

            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    check_device(t, "tensor")
    if t.dtype == torch.bool:  # DLPack's bool type is recent; the uint8 bits view the same everywhere
        return _from_dlpack(t.view(torch.uint8)).view(bool)
    if t.dtype == torch.bfloat16 and _cupy_bf16_route(t.device) == "int16":
        import ml_dtypes

        return _from_dlpack(t.view(torch.int16)).view(ml_dtypes.bfloat16)
    return _from_dlpack(t)


def _from_dlpack(t: torch.Tensor):
    import cupy

    # CuPy passes its current stream to ``t.__dlpack__``; under ``on_stream`` that is torch's current
    # stream, so torch inserts no cross-stream wait.
    return cupy.from_dlpack(t)


@functools.cache
def _cupy_bf16_route(device: torch.device) -> str:
    """'dlpack' when CuPy imports bf16 tensors through DLPack; 'int16' when it only takes them
    reinterpreted as int16 and viewed back as ml_dtypes.bfloat16 (CuPy releases differ)."""
    import ml_dtypes

    probe = torch.zeros(1, dtype=torch.bfloat16, device=device)
    try:
        arr = _from_dlpack(probe)
        if arr.dtype == ml_dtypes.bfloat16:
            return "dlpack"
    except Exception:  # which exception depends on the CuPy release; the fallback below is the answer
        pass
    try:
        _from_dlpack(probe.view(torch.int16)).view(ml_dtypes.bfloat16)
    except Exception as e:
        raise TypeError(f"this CuPy ({__import__('cupy').__version__}) takes bfloat16 neither through DLPack nor "
                        f"as an int16 view ({type(e).__name__}: {e}); install a CuPy with bfloat16 support "
                        "(with ml_dtypes), or cast the tensors to float16 / float32") from e
    return "int16"


@contextlib.contextmanager
def on_stream(device: torch.device):
    """Run the body with CuPy on ``device`` and on torch's current stream there (no-op on the CPU)."""
    if device.type != "cuda":
        yield
        return
    import cupy

    with cupy.cuda.Device(device.index):
        with cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream):
            yield
