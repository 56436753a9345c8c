"""EFFICIENT: memory-efficient attention in Numba CUDA (kernels_numba); fp16/bf16/fp32, every mask kind.

On CuPy arrays the kernels run on the GPU. On NumPy arrays they run on Numba's CUDA simulator, and
only when asked for: with NUMBA_ENABLE_CUDASIM=1 set before numba is imported, and with MATH
disabled, i.e. inside ``cusdpa.sdpa_kernel([Backend.EFFICIENT])``. MATH stays the default on NumPy
arrays because the simulator is a CPU emulation of a GPU, for tests on tiny shapes.
"""
from __future__ import annotations

from .. import dispatch, environment
from ..dispatch import Backend, Capabilities, Implementation

CAPABILITIES = Capabilities(dtypes=frozenset({"float16", "bfloat16", "float32"}), max_head_dim=256,
                            zero_head_dim=False, softcap=False, alibi=False)


def _environment_reasons(pr):
    reasons = []
    on_numpy = pr is not None and pr.xp.__name__ == "numpy"
    if pr is not None:
        if on_numpy and not environment.simulator_enabled():
            reasons.append("takes NumPy arrays only on the CUDA simulator (set NUMBA_ENABLE_CUDASIM=1 before "
                           "importing numba and select EFFICIENT with sdpa_kernel)")
        elif on_numpy and Backend.MATH in dispatch.enabled_backends():
            reasons.append("runs NumPy arrays on the CUDA simulator only when MATH is disabled "
                           "(sdpa_kernel([Backend.EFFICIENT])); MATH is the default on NumPy")
        elif not on_numpy and environment.simulator_enabled():
            reasons.append("NUMBA_ENABLE_CUDASIM=1 makes Numba simulate the GPU, which takes NumPy arrays only")
    if reasons:
        return reasons
    problem = environment.numba_cuda_problem()
    if problem:
        return [problem]
    if pr is not None:
        import kernels_numba

        reasons.extend(kernels_numba.reasons(pr))
    return reasons


def _forward(pr, out=None, lse=None):
    import kernels_numba

    return kernels_numba.forward(pr, out, lse)


def _backward(pr, out, lse, dout, deterministic=False, grads=None):
    # No atomics anywhere in the backward: every run gives the same bits, deterministic or not.
    import kernels_numba

    return kernels_numba.backward(pr, out, lse, dout, grads)


IMPL = Implementation(backend=Backend.EFFICIENT, capabilities=CAPABILITIES, environment_reasons=_environment_reasons,
                      forward=_forward, backward=_backward)
