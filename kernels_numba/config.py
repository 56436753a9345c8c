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
    block_rows: threads per block of the portable forward, one query row per thread. 64 keeps two
      warps busy per block on short sequences.
    tile_rows: rows of the key/value tile the portable forward stages in shared memory per step;
      lowered automatically so the fp32 tiles fit in ``smem_bytes``; a multiple of 4 (one Philox call
      gives 4 columns of dropout decisions).
    smem_bytes: shared memory the portable kernels may use per block (static, so <= 48 KiB).
    bwd_threads: the backward's blocks are bwd_threads x bwd_threads threads (a power of two <= 32);
      16 gives 256 threads, two blocks per SM at <= 128 registers per thread.
    bwd_sub: score-tile rows and columns per backward thread, so the tiles are BLOCK_M = BLOCK_N =
      bwd_threads * bwd_sub = 64 rows. 4 x 4 per thread: each value read from shared memory feeds 4
      FMAs (8 loads per 16 FMAs), with the S and dP pieces taking 32 registers. The dk/dv kernel halves
      it along keys for head dims over 128, so its dK and dV accumulators (bwd_sub * (E + Ev) /
      bwd_threads per thread) stay at <= 64 registers.
    bwd_chunk: head-dim columns per staged step of the backward's score products, and the most rows per
      staged step of its gradient products (fewer where a wide head dim must fit ``smem_bytes``).
    prepared_launches: a call whose argument signature was seen launches each kernel through
      ``cuLaunchKernel`` with its arguments flattened (kernels_numba.launcher), not through Numba's
      dispatcher. Off until run on a GPU: written and tested under the simulator (whose path is Numba's
      either way) in a session without device time left; tests/test_efficient_gpu.py turns it on.
    """

    variant: str = "auto"
    block_rows: int = 64
    tile_rows: int = 32
    smem_bytes: int = 40 * 1024
    bwd_threads: int = 16
    bwd_sub: int = 4
    bwd_chunk: int = 32
    prepared_launches: bool = False

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
        if self.bwd_threads not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"bwd_threads={self.bwd_threads} must be a power of two <= 32 (bwd_threads**2 threads)")
        if not 1 <= self.bwd_sub <= 8:
            raise ValueError(f"bwd_sub={self.bwd_sub} must be in [1, 8] (2 * bwd_sub**2 registers of score tiles)")
        if self.bwd_chunk < 1:
            raise ValueError(f"bwd_chunk={self.bwd_chunk} must be positive")

    def tile_for(self, head_dim: int, head_dim_v: int) -> int:
        """Tile rows for fp32 tiles of width head_dim + head_dim_v within smem_bytes (multiple of 4, >= 4)."""
        fit = self.smem_bytes // (4 * (head_dim + head_dim_v))
        return max(4, min(self.tile_rows, fit) // 4 * 4)

    def backward_tiles(self, head_dim: int, head_dim_v: int, dkdv: bool) -> tuple[int, int, int]:
        """(sub_n, sub_m, rows) of a backward kernel (the dk/dv one when ``dkdv``, else dq) for head dims
        rounded up to a multiple of bwd_threads; rows (a power of two, so it divides the reduced block)
        is what fits beside the weights tile in ``smem_bytes``."""
        g, widest = self.bwd_threads, max(head_dim, head_dim_v)
        sub_n = max(1, self.bwd_sub // 2) if dkdv and widest > 128 else self.bwd_sub
        block_n, block_m = g * sub_n, g * self.bwd_sub
        # the dk/dv kernel keeps P^T/dS^T as [BLOCK_M, BLOCK_N + 1] plus lse and delta; dq keeps dS
        fixed = block_m * (block_n + 1) + 2 * block_m if dkdv else block_n * (block_m + 1)
        score = (block_n + block_m) * (self.bwd_chunk + 1)
        room = self.smem_bytes // 4 - fixed
        rows = min(block_m if dkdv else block_n, self.bwd_chunk, max(1, room // (widest + 1)))
        rows = 1 << (rows.bit_length() - 1)
        if fixed + max(score, rows * (widest + 1)) > self.smem_bytes // 4:
            raise ValueError(f"the backward's tiles for head dim {widest} need more than smem_bytes="
                             f"{self.smem_bytes}; lower bwd_sub ({self.bwd_sub}) or bwd_chunk ({self.bwd_chunk})")
        return sub_n, self.bwd_sub, rows


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
