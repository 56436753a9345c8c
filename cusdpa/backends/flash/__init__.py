"""FLASH: FlashAttention-style fused attention on tensor cores (CUDA C++ in kernels_cuda, compiled by
CuPy's NVRTC): wgmma on Hopper for the forward where the head dims allow, mma.sync elsewhere.

``config`` chooses tiles, ``sources`` compiles kernels, ``launches`` lays out operands and builds the
launches of the general path, ``plans`` prepares them once per call signature for repeated calls.
"""
from __future__ import annotations

from ...dispatch import Backend, Capabilities, Implementation
from . import launches

CAPABILITIES = Capabilities(arrays=frozenset({"cupy"}), dtypes=frozenset({"float16", "bfloat16"}),
                            max_head_dim=256, head_dim_multiple=8, zero_head_dim=False)

IMPL = Implementation(backend=Backend.FLASH, capabilities=CAPABILITIES,
                      environment_reasons=launches.environment_reasons, forward=launches.forward,
                      backward=launches.backward, backward_reasons=launches.backward_reasons)
