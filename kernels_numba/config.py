"""Tuning knobs of the EFFICIENT kernels, one frozen dataclass, and which kernel variant runs.

The knobs in force are a context variable: ``with configured(KernelConfig(variant="portable")):``
runs the body with other knobs (tests use it to run both variants and tiny tiles under the simulator).
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

VARIANTS = ("auto", "portable", "tensor_core")


@dataclass(frozen=True)
class KernelConfig:
    """Knobs of the Numba kernels.

    variant: "portable" is pure Numba (fp32 FMAs; every dtype and feature; the one the CUDA
      simulator runs); "tensor_core" runs the forward tile loop in a linked CUDA C device function on
      mma.sync (fp16/bf16, unit-stride head dim, E and Ev <= 128, real GPU only); "auto" takes
      tensor_core where it applies and portable elsewhere. The backward is portable in every variant.
    block_rows: threads per block of the portable kernels, one query row (forward, dq) or one key row
      (dk/dv) per thread. 64 keeps two warps busy per block on short sequences.
    tile_rows: rows of the key/value (or query/dout) tile staged in shared memory per step; lowered
      automatically so the fp32 tiles fit in ``smem_bytes``; a multiple of 4 (one Philox call gives
      4 columns of dropout decisions).
    smem_bytes: shared memory the portable kernels may use per block (static, so <= 48 KiB).
    """

    variant: str = "auto"
    block_rows: int = 64
    tile_rows: int = 32
    smem_bytes: int = 40 * 1024

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant={self.variant!r} must be one of {VARIANTS}")
        if self.block_rows < 1 or self.block_rows > 1024:
            raise ValueError(f"block_rows={self.block_rows} must be in [1, 1024] (threads per block)")
        if self.tile_rows < 4 or self.tile_rows % 4:
            raise ValueError(f"tile_rows={self.tile_rows} must be a positive multiple of 4")
        if not 0 < self.smem_bytes <= 48 * 1024:
            raise ValueError(f"smem_bytes={self.smem_bytes} must be in (0, 49152]: Numba has no API to raise "
                             "the 48 KiB static shared-memory limit")

    def tile_for(self, head_dim: int, head_dim_v: int) -> int:
        """Tile rows for fp32 tiles of width head_dim + head_dim_v within smem_bytes (multiple of 4, >= 4)."""
        fit = self.smem_bytes // (4 * (head_dim + head_dim_v))
        return max(4, min(self.tile_rows, fit) // 4 * 4)


_current: contextvars.ContextVar[KernelConfig] = contextvars.ContextVar("kernels_numba_config",
                                                                       default=KernelConfig())


def current() -> KernelConfig:
    return _current.get()


@contextlib.contextmanager
def configured(config: KernelConfig):
    """Run the body with ``config`` as the knobs of every EFFICIENT kernel launch."""
    if not isinstance(config, KernelConfig):
        raise TypeError(f"configured takes a KernelConfig, got {config!r}")
    token = _current.set(config)
    try:
        yield config
    finally:
        _current.reset(token)
