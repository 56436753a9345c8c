"""What this machine has: CuPy and a CUDA GPU, Numba CUDA (or its simulator), library versions.

Probes are cached and import lazily, so ``import cusdpa`` never touches a GPU.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import os
import platform
import sys


def simulator_enabled() -> bool:
    """NUMBA_ENABLE_CUDASIM=1: Numba CUDA kernels run on the CPU (tiny shapes only)."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def simulate_missing_gpu() -> str | None:
    """Without a usable GPU, switch Numba to its CUDA simulator so that EFFICIENT runs on the CPU.

    Numba reads NUMBA_ENABLE_CUDASIM once, when numba.cuda is first imported, so this only works
    before that; returns a note for the user when it switched.
    """
    if simulator_enabled() or cupy_problem() is None or "numba" in sys.modules:
        return None
    if importlib.util.find_spec("numba") is None:
        return None
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    return "no usable CUDA GPU: EFFICIENT runs on Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1), tiny sizes only"


@functools.cache
def cupy_problem() -> str | None:
    """None when CuPy imports and sees a CUDA GPU, else why not."""
    try:
        import cupy
    except Exception as e:  # ImportError, or a CUDA library that fails to load
        return f"CuPy is not usable ({type(e).__name__}: {e}); install cusdpa[cuda] on a machine with an NVIDIA GPU"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return f"CuPy finds no CUDA GPU ({type(e).__name__}: {e})"
    return None if n > 0 else "CuPy finds no CUDA GPU"


@functools.cache
def numba_cuda_problem() -> str | None:
    """None when Numba's CUDA target (real or simulated) imports and can run, else why not."""
    try:
        from numba import cuda
    except Exception as e:
        return f"numba-cuda is not usable ({type(e).__name__}: {e}); install cusdpa[cuda]"
    if simulator_enabled():
        return None
    try:
        if not cuda.is_available():
            return "Numba finds no CUDA GPU (set NUMBA_ENABLE_CUDASIM=1 to run its kernels on the CPU simulator)"
    except Exception as e:
        return f"Numba CUDA fails to start ({type(e).__name__}: {e})"
    return None


def gpus() -> list[str]:
    """One line per visible GPU: index, name, compute capability, memory."""
    if cupy_problem():
        return []
    import cupy

    lines = []
    for i in range(cupy.cuda.runtime.getDeviceCount()):
        p = cupy.cuda.runtime.getDeviceProperties(i)
        name = p["name"].decode() if isinstance(p["name"], bytes) else p["name"]
        lines.append(f"cuda:{i} {name}, compute capability {p['major']}.{p['minor']}, "
                     f"{p['multiProcessorCount']} SMs, {p['totalGlobalMem'] / 2**30:.0f} GiB")
    return lines


def versions() -> dict[str, str]:
    """Versions of Python and of every library cusdpa can use ('not installed' when absent)."""
    out = {"python": platform.python_version()}
    for dist in ("numpy", "cupy-cuda13x", "cupy-cuda12x", "numba", "numba-cuda", "torch", "ml_dtypes", "triton"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            if not dist.startswith("cupy-cuda12"):
                out[dist] = "not installed"
    return out
