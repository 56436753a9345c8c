"""Timers: medians of CUDA-event timings after warm-up with the L2 cache flushed (GPU), or of
wall-clock timings (CPU).

Every function is called once, outside the timer, before it is timed (the correctness check), so
compilation never lands in a measurement. The timer then times one more call, the probe, and a second
one when the first says fewer than ``FEW`` calls fit in the repetition budget (one call interrupted by
the machine must not make a fast function "slow"); the faster probe decides. When at least ``FEW`` calls
fit, the GPU timer hands the function to ``triton.testing.do_bench`` (where triton is installed; else an
equivalent loop of CUDA events); slower calls get ``min_runs`` runs in all (at least the two probes), so a
call of seconds costs seconds.
"""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass

FEW = 5
L2_FLUSH_BYTES = 256 * 2**20  # larger than any GPU's L2 (50 MB on an H100), as triton's do_bench uses


@dataclass(frozen=True)
class Timing:
    ms: float  # median
    runs: int | None  # None: triton's do_bench chose how many
    method: str


class Timer:
    """The common protocol; subclasses time ``n`` runs of a function."""

    method = ""

    def __init__(self, warmup_ms: float, rep_ms: float, min_runs: int):
        self.warmup_ms, self.rep_ms, self.min_runs = warmup_ms, rep_ms, min_runs

    def runs(self, fn, n: int, grad_to_none) -> list[float]:
        raise NotImplementedError

    def many(self, fn, probe: float, fits: int, grad_to_none) -> Timing:
        self.runs(fn, max(1, int(self.warmup_ms / max(probe, 1e-3))), grad_to_none)
        times = self.runs(fn, min(fits, 1000), grad_to_none)
        return Timing(statistics.median(times), len(times), self.method)

    def __call__(self, fn, grad_to_none=None) -> Timing:
        """Median milliseconds of ``fn()``; ``grad_to_none`` tensors get .grad = None before each run."""
        probes = self.runs(fn, 1, grad_to_none)
        if self.rep_ms < FEW * probes[0]:
            probes += self.runs(fn, 1, grad_to_none)
        probe = min(probes)
        fits = int(self.rep_ms / max(probe, 1e-3))
        if fits >= FEW:
            return self.many(fn, probe, fits, grad_to_none)
        times = probes + self.runs(fn, max(0, self.min_runs - len(probes)), grad_to_none)
        return Timing(statistics.median(times), len(times), self.method + " (slow call: few runs)")


class GpuTimer(Timer):
    """CUDA events on torch's current stream, the one CuPy's and Numba's default launches also use."""

    method = "cuda events, L2 flushed"

    def __init__(self, torch, warmup_ms: float, rep_ms: float, min_runs: int = 3):
        super().__init__(warmup_ms, rep_ms, min_runs)
        self.torch = torch
        try:
            import triton.testing

            self.do_bench = triton.testing.do_bench
        except ImportError:
            self.do_bench = None
        self._flush = None

    def runs(self, fn, n: int, grad_to_none) -> list[float]:
        torch = self.torch
        if self._flush is None:
            self._flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in pairs:
            for x in grad_to_none or ():
                x.grad = None
            self._flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in pairs]

    def many(self, fn, probe: float, fits: int, grad_to_none) -> Timing:
        if self.do_bench is None:
            return super().many(fn, probe, fits, grad_to_none)
        ms = self.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, grad_to_none=grad_to_none,
                           return_mode="median")
        return Timing(float(ms), None, "triton.testing.do_bench, L2 flushed")


class CpuTimer(Timer):
    """Wall-clock medians, nothing flushed: CPU timings of toy sizes, no statement about GPU speed. The
    garbage collector is off while timing (as in timeit): a collection of milliseconds would otherwise land
    in whichever call it interrupts, a probe among them."""

    method = "wall clock"

    def __init__(self, warmup_ms: float, rep_ms: float, min_runs: int = 1):
        super().__init__(warmup_ms, rep_ms, min_runs)

    def runs(self, fn, n: int, grad_to_none) -> list[float]:
        out = []
        enabled = gc.isenabled()
        gc.disable()
        try:
            for _ in range(n):
                for x in grad_to_none or ():
                    x.grad = None
                t0 = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t0) * 1e3)
        finally:
            if enabled:
                gc.enable()
        return out


def print_kernels(name: str, fn, calls: int = 10, rows: int = 6) -> None:
    """Print the GPU kernels of ``calls`` calls of ``fn`` (torch.profiler's table of ``rows`` rows, after one
    warm-up call)."""
    import torch

    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as kernels:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    print(f"\n{name}: GPU kernels of {calls} calls")
    print(kernels.key_averages().table(sort_by="cuda_time_total", row_limit=rows))

