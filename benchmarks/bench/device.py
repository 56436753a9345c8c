"""Where the bench runs: a CUDA GPU (CuPy arrays for cusdpa, torch tensors sharing their memory for
PyTorch) or the CPU (NumPy arrays and torch CPU tensors with the same values)."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np

from cusdpa import environment
from cusdpa.verify import harness, judge
from .config import SetupError
from .timing import CpuTimer, GpuTimer

# on every table and plot of a run without a GPU
CPU_CAVEAT = ("CPU, toy sizes, reference implementation - not a performance result (cusdpa: its NumPy reference "
              "and EFFICIENT on Numba's CUDA simulator; torch: its CPU kernels, one thread)")


@dataclass(frozen=True)
class Point:
    """One dense attention problem: (B, H, L, E) query, (B, H, S, E) key and value."""

    B: int
    H: int
    L: int
    S: int
    E: int
    dtype: str
    causal: bool

    def flops(self, direction: str) -> float:
        """docs/DESIGN.md: forward 4 B H L S E, halved for causal with L == S; backward 2.5x forward."""
        f = 4.0 * self.B * self.H * self.L * self.S * self.E
        if self.causal and self.L == self.S:
            f /= 2
        return f * (2.5 if direction == "bwd" else 1.0)

    def fields(self) -> dict:
        return dict(dtype=self.dtype, B=self.B, H=self.H, L=self.L, S=self.S, E=self.E, causal=self.causal)


@dataclass
class Inputs:
    """q, k, v, dout as cusdpa arrays (NumPy or CuPy) and as torch tensors with the same values."""

    arrays: tuple
    tensors: tuple | None


class Device:
    """The machine's side of the bench: inputs, float64 copies for judging, memory, the timer, and the caveat
    every table and plot of a CPU run carries (None on a GPU)."""

    def __init__(self, gpu: bool, torch, sizes):
        self.gpu, self.torch = gpu, torch
        self.caveat = None if gpu else CPU_CAVEAT
        if gpu:
            self.timer = GpuTimer(torch, sizes.warmup_ms, sizes.rep_ms)
        else:
            self.timer = CpuTimer(sizes.warmup_ms, sizes.rep_ms)

    @classmethod
    def detect(cls, sizes) -> tuple["Device", str]:
        """The device and a line saying what runs where."""
        if importlib.util.find_spec("torch") is None:
            raise SetupError("bench compares with PyTorch and checks every result against PyTorch's error at the "
                             "same precision; install torch (pip install 'cusdpa[bench]')")
        import torch

        cupy_problem = environment.cupy_problem()
        if cupy_problem is None:
            if not torch.cuda.is_available():
                raise SetupError("bench on a GPU compares with PyTorch and times with its CUDA events; install a "
                                   "CUDA build of torch (pip install 'cusdpa[bench]')")
            return cls(True, torch, sizes), f"GPU: {environment.gpus()[0]}"
        # Toy sizes gain nothing from torch's intra-op threads, and on a busy machine a call of microseconds
        # then waits milliseconds for a descheduled thread: torch gets one thread, as NumPy's small calls have
        torch.set_num_threads(1)
        line = (f"no GPU comparison: it needs a CUDA GPU with CuPy ({cupy_problem}). Running the small CPU "
                "configuration instead: the NumPy reference (MATH), EFFICIENT on Numba's CUDA simulator, "
                "torch's CPU SDPA on one thread; CPU wall-clock timings of toy sizes say nothing about GPU speed")
        return cls(False, torch, sizes), line

    def inputs(self, point: Point, seed: int) -> Inputs:
        shapes = [(point.B, point.H, n, point.E) for n in (point.L, point.S, point.S, point.L)]
        torch = self.torch
        if self.gpu:
            from interop import bridge

            gen = torch.Generator(device="cuda").manual_seed(seed)
            tensors = tuple(torch.randn(s, generator=gen, device="cuda", dtype=getattr(torch, point.dtype))
                            for s in shapes)
            return Inputs(tuple(bridge.as_array(t) for t in tensors), tensors)
        rng = np.random.default_rng(seed)
        arrays = tuple(harness.draw(rng, s, point.dtype) for s in shapes)
        return Inputs(arrays, tuple(torch.from_numpy(x.astype(np.float32)).to(getattr(torch, point.dtype))
                                    for x in arrays))

    def wide(self, x):
        """float64 copy on this device of a NumPy/CuPy array or a torch tensor, for judging."""
        if isinstance(x, self.torch.Tensor):
            x = x.detach().double()
            if not self.gpu:
                return x.numpy()
            from interop import bridge

            return bridge.as_array(x)
        return judge.to_float64(x)

    def free(self) -> None:
        """Give cached memory back, so the next point (or torch's MATH) finds it."""
        if not self.gpu:
            return
        import cupy

        cupy.get_default_memory_pool().free_all_blocks()
        self.torch.cuda.empty_cache()

    def synchronize(self) -> None:
        if self.gpu:
            self.torch.cuda.synchronize()
