"""cusdpa: scaled-dot-product attention as CuPy RawKernels and Numba CUDA kernels.

``import cusdpa`` needs only NumPy; CuPy, Numba and torch are imported when a backend needs them.
"""
from .api import (attention_vjp, explain, scaled_dot_product_attention, varlen_attention,
                  varlen_attention_vjp)
from .block_mask import BlockMask
from .dispatch import Backend, sdpa_kernel
from .errors import ArgumentError, ArgumentTypeError
from .kv_cache import kv_cache_attention

__version__ = "0.1.0"
__all__ = ["scaled_dot_product_attention", "attention_vjp", "varlen_attention", "varlen_attention_vjp", "kv_cache_attention",
           "BlockMask", "Backend", "sdpa_kernel", "explain", "ArgumentError", "ArgumentTypeError"]
