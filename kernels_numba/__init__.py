"""Numba CUDA kernels of the EFFICIENT backend: memory-efficient attention, forward and backward.

Two variants of the forward (``KernelConfig.variant``): "portable" (kernels_numba.blocked_forward), pure
Numba with fp32 FMAs, blocked like a GEMM, which runs every dtype and feature and also runs on the CPU
under NUMBA_ENABLE_CUDASIM=1; and "tensor_core", whose tile loop is a linked CUDA C device function on
mma.sync (fp16/bf16, and fp32 on TF32 tensor cores as three products of split operands, on a GPU). The backward follows the variant: FlashAttention-2's dq and dk/dv as linked
CUDA C tile loops (kernels_numba.tensor_core), or pure Numba kernels on the portable forward's tile products
(kernels_numba.gradients). Importing this package imports
numba.cuda (not cusdpa, not interop).
"""
from .attention import backward, dq_accum_elements, forward, fuses, reasons, variant_for
from .config import KernelConfig, configured, current

__all__ = ["forward", "backward", "reasons", "variant_for", "fuses", "dq_accum_elements", "KernelConfig", "configured",
           "current"]
