"""What ``python -m cusdpa check`` runs: the targets (a backend on an array type), its suite of cases, and
the bookkeeping of one case on one target that the suite and the fuzz (fuzz.py) share."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np

from .. import dispatch, environment
from ..dispatch import Backend
from .harness import Case, build, run_problem


@dataclass(frozen=True)
class Target:
    """One backend on one array type ("numpy" or "cupy"); EFFICIENT on NumPy arrays is the simulator."""

    backend: Backend
    xp_name: str

    @property
    def name(self) -> str:
        return f"{self.backend.name} ({self.xp_name})"

    @property
    def impl(self) -> dispatch.Implementation:
        return dispatch.implementation(self.backend)

    @property
    def simulator(self) -> bool:
        return self.backend is Backend.EFFICIENT and self.xp_name == "numpy"

    @property
    def xp(self):
        if self.xp_name == "numpy":
            return np
        import cupy

        return cupy

    def unavailable(self) -> str | None:
        """Why this target cannot run on this machine, or None."""
        reasons = self.impl.environment_reasons(None)
        if self.xp_name == "cupy" and not reasons and environment.cupy_problem():
            reasons = [environment.cupy_problem()]
        return "; ".join(reasons) or None

    @contextlib.contextmanager
    def running(self):
        """Only this backend enabled (EFFICIENT takes NumPy arrays only while MATH, their default, is
        disabled); on the simulator, its tiny tiles."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(dispatch.sdpa_kernel([self.backend]))
            if self.simulator:
                import kernels_numba

                stack.enter_context(kernels_numba.configured(simulator_tiles()))
            yield


def simulator_tiles():
    """The kernels_numba.KernelConfig for Numba's CUDA simulator, which runs each GPU thread as a Python
    thread: tiles of 4 to 8 rows, so that even L = 5 spans several, and 2 x 2-thread backward blocks
    (the default 16 x 16 takes seconds a head there)."""
    import kernels_numba

    return kernels_numba.KernelConfig(variant="portable", threads=2, sub=2,
                                      chunk=4)


def targets(backends) -> list[Target]:
    """The targets to check: every backend on CuPy arrays (reported as skipped, with the reason, where no
    GPU is usable), MATH on NumPy arrays too (the reference path), and EFFICIENT on NumPy arrays instead
    when Numba simulates the GPU."""
    out = []
    for b in backends:
        simulated = b is Backend.EFFICIENT and environment.simulator_enabled()
        out.append(Target(b, "numpy" if simulated else "cupy"))
        if b is Backend.MATH:
            out.append(Target(b, "numpy"))
    return out


@dataclass
class Outcome:
    """What check found for one target."""

    target: str  # e.g. "FLASH (cupy)"
    passed: int = 0
    failed: int = 0
    not_supported: int = 0
    failures: list = field(default_factory=list)  # messages, one or more per failed case
    skipped: str | None = None  # why the target did not run at all

    def run(self, target: Target, case: Case, rng) -> list[str]:
        """Run ``case`` on ``target`` (inside ``target.running()``) with values from ``rng``, count it and
        return its failures; a crash is a failure of the case, reported with its type."""
        try:
            pr = build(case, target.xp, rng)
            if target.impl.not_supported_reasons(pr, need_grad=True):
                self.not_supported += 1
                return []
            failures = run_problem(pr, target.impl, rng)
        except Exception as e:
            failures = [f"{type(e).__name__}: {e}"]
        self.failures += [f"{case}: {f}" for f in failures]
        self.failed += bool(failures)
        self.passed += not failures
        return failures


def suite(dtype: str, simulator: bool) -> list[Case]:
    """Random cases covering each feature once, in ``dtype``; tiny ones where kernels run on the simulator."""
    if simulator:  # Numba's CUDA simulator runs each GPU thread as a Python thread
        return [Case(dtype, batch=(1,), hq=2, hkv=1, L=5, S=7, E=8, causal="lower_right"),
                Case(dtype, batch=(1,), L=6, S=6, E=4, Ev=8, causal="upper_left", window=(2, 0), dropout_p=0.3),
                Case(dtype, hq=2, hkv=2, E=8, varlen=((3, 5), (4, 2)), causal="upper_left")]
    return [Case(dtype, batch=(2,), hq=4, hkv=4, L=97, S=97, E=64, causal="upper_left"),
            Case(dtype, batch=(1,), hq=4, hkv=2, L=33, S=130, E=40, causal="lower_right"),
            Case(dtype, batch=(2,), L=65, S=65, E=128, causal="upper_left", window=(16, 0)),
            Case(dtype, batch=(1,), L=70, S=70, E=72, dropout_p=0.2),
            Case(dtype, L=50, S=50, E=64, transposed=True),
            Case(dtype, hq=2, hkv=1, E=64, varlen=((37, 37), (64, 80), (1, 5)), causal="upper_left")]


def check_target(target: Target, rng) -> Outcome:
    """Run the suite through one target, in each dtype its backend takes."""
    outcome = Outcome(target.name, skipped=target.unavailable())
    if outcome.skipped:
        return outcome
    dtypes = [d for d in ("float16", "bfloat16", "float32") if d in target.impl.capabilities.dtypes]
    with target.running():
        for dtype in dtypes:
            for case in suite(dtype, target.simulator):
                outcome.run(target, case, rng)
    return outcome
