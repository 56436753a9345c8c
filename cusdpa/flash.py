"""FLASH: FlashAttention-2-style fused attention on tensor cores (CUDA C++ in cusdpa/cuda, via CuPy)."""
from __future__ import annotations

from . import environment
from .dispatch import Backend, Capabilities, Implementation

CAPABILITIES = Capabilities(arrays=frozenset({"cupy"}), dtypes=frozenset({"float16", "bfloat16"}),
                            max_head_dim=256, head_dim_multiple=8, mask_kinds=frozenset(), unit_stride=True)


def _environment_reasons(pr):
    reasons = []
    problem = environment.cupy_problem()
    if problem:
        reasons.append(problem)
    reasons.append("the FLASH kernels are not built yet (issue #3)")
    return reasons


def _unavailable(*args, **kwargs):
    raise NotImplementedError("the FLASH kernels are not built yet")


IMPL = Implementation(backend=Backend.FLASH, capabilities=CAPABILITIES, environment_reasons=_environment_reasons,
                      forward=_unavailable, backward=_unavailable)
