"""EFFICIENT: memory-efficient attention in Numba CUDA (kernels_numba); every dtype, arbitrary masks."""
from __future__ import annotations

from . import environment
from .dispatch import Backend, Capabilities, Implementation

CAPABILITIES = Capabilities(max_head_dim=256)


def _environment_reasons(pr):
    reasons = []
    problem = environment.numba_cuda_problem()
    if problem:
        reasons.append(problem)
    reasons.append("the EFFICIENT kernels are not built yet (issue #4)")
    return reasons


def _unavailable(*args, **kwargs):
    raise NotImplementedError("the EFFICIENT kernels are not built yet")


IMPL = Implementation(backend=Backend.EFFICIENT, capabilities=CAPABILITIES, environment_reasons=_environment_reasons,
                      forward=_unavailable, backward=_unavailable)
