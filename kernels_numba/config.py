"""Tuning knobs of the EFFICIENT kernels, one frozen dataclass, and which kernel variant runs.

The knobs in force are a context variable: ``with configured(KernelConfig(variant="portable")):``
runs the body with other knobs (tests use it to run both variants and tiny tiles under the simulator).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import dataclass

VARIANTS = ("auto", "portable", "tensor_core")


@dataclass(frozen=True)
class KernelConfig:
    """Knobs of the Numba kernels.

    variant: "portable" is pure Numba (fp32 FMAs; every dtype and feature; the one the CUDA
      simulator runs); "tensor_core" runs the tile loops, forward and backward, in linked CUDA C device
      functions on mma.sync (fp16/bf16 with E and Ev <= 128, fp32 too with tensor_core_fp32; unit-stride head dim,
      real GPU only; the backward also needs q, k and v not broadcast over batch dims, else it is
      portable); "auto" takes tensor_core
      where it applies and portable elsewhere.
    smem_bytes: shared memory the portable kernels may use per block (static, so <= 48 KiB).
    threads: the portable kernels' blocks (forward and backward, all blocked like a GEMM) are threads x
      threads threads (a power of two <= 32); 16 gives 256 threads, two blocks per SM at <= 128 registers
      per thread.
    sub: score-tile rows and columns per thread, so the tiles are BLOCK_M = BLOCK_N = threads * sub = 64
      rows. 4 x 4 per thread: each value read from shared memory feeds 4 FMAs (8 loads per 16 FMAs), with
      the S and dP pieces taking 32 registers. The dk/dv kernel halves it along keys for head dims over
      128, so its dK and dV accumulators (sub * (E + Ev) / threads per thread) stay at <= 64 registers.
    chunk: head-dim columns per staged step of the score products, and the most rows per staged step of
      the products with a probability-side tile (P V, dQ, dK, dV; fewer where a wide head dim must fit
      ``smem_bytes``).
    tensor_core_blocks: 128-thread blocks per SM that the tensor_core kernels' registers leave room for: their
      register cap is the 64K-register file over that many blocks (2: 255, the compiler's own choice; 3: 168).
      3 on the H200 (BENCHMARKS.md): the mma.sync loops stall on fixed latencies, which a third block per SM
      hides (backward +40% at E = 64, forward +10% at E = 128) although E = 128 then spills.
    tensor_core_dkdv_blocks: the same for the 16-bit dk/dv loop alone (not fused) at head dim 128 (97-128, padded
      to it); 0: as tensor_core_blocks. 2 (255 registers): there its dK and dV accumulators (128 registers a
      thread) spill at 168 registers, 41 loads and 33 stores of local memory a step of its main loop (nvcc 13.0,
      bf16, the loop inlined as Numba's LTO links it), none at 255. On the H100 (bf16 B = 4 L = 4096 Hq * E = 2048,
      two runs a side) the backward at head dim 128 rose 0.81x -> 0.94x PyTorch's, causal 0.91x -> 1.04x, with a
      bool mask 0.83x -> 0.93x (BENCHMARKS.md, forty-eighth session). At head dim 96 the loop spills 9-12 a step
      at 168: not measured, so not taken there.
    tensor_core_dq_blocks: the same for the 16-bit dq loop (not fused) at head dim 128; 0: as tensor_core_blocks.
      At 168 registers it spills 15 loads and 6 stores a step of its main loop, 1426 instructions a step against
      1120 at 255 (nvcc 13.0, bf16, inlined). Not yet timed (2 blocks for every kernel, dq included, had cost the
      backward at 128 4% before the dk/dv loop took its own cap).
    tensor_core_head_dim: the widest head dim the tensor_core loops take: 128, or up to 256 (padded to 160,
      192, 224, 256; forward: 32-key tiles, two blocks per SM; backward: column parts, two warps per 16 rows).
      256: on the H100 (bf16 L = 4096 Hq * E = 2048) head dims 192 and 256 ran forward 142-161 TFLOP/s (0.95-1.23x
      PyTorch's EFFICIENT_ATTENTION) and backward 78-82 (2.1-2.5x) on them, against 11 and 6 on the portable
      kernels that 128 leaves them (BENCHMARKS.md).
    tensor_core_fp32: fp32 inputs take the tensor_core loops too (TF32 tensor cores, each product as three of
      split operands, within 2^-23 relative: about fp32's accuracy, as PyTorch's EFFICIENT_ATTENTION runs fp32;
      head dims <= 128; past 96 the backward takes column parts; each k-step's three products are added to the
      accumulators rounded to nearest, not in the tensor cores' truncating accumulator); off: fp32 runs on the
      portable kernels' FMAs. On: on the H200 (B=4 L=2048 Hq*E=1024) it ran the forward 2.0-2.4x and the
      backward at E = 64 1.8x faster than the portable kernels (at E = 128 the backward only matches them),
      passing the fp32 judge on the GPU test grid.
    tensor_core_fp32_fast_split: fp32's tensor_core loops learn, as each staged tile lands, whether all its
      elements are finite (one read-back of a thread's own share, ANDed by the barrier that was there), and each
      warp whether its held Q, dO or K fragments are, and split finite operands into their TF32 parts in 4
      instructions where the non-finite cases take 9 (the split was most of the fp32 loops' instructions, against
      7% MMAs at head dim 128); the same bits. nvcc 13.0 SASS: the loops' fast paths 15-31% fewer instructions.
      On the H100 (B = 4 L = 2048 Hq * E = 1024): forward +16-26%, backward +29-31% (BENCHMARKS.md).
    tensor_core_shared_scores: where the tensor_core backward takes column parts (16-bit past head dim 128, fp32
      past 96: two warps a 16 rows, each accumulating half the gradient's columns), the pair splits the score
      products instead of both computing them: in dq one warp S = Q K^T, the other dP = dO V^T (each then holds
      one A fragment set, Q or dO, not both), in dk/dv one S^T = K Q^T, the other dP^T = V dO^T; they trade
      halves through shared memory under a named barrier a pair, each computes dS (and P o Z) of half the score
      tiles, and both take the whole as the A operand of their column half. The duplicated products cost 1.67x the
      needed MMAs in dq and 1.5x in dk/dv (and their fp32 splits), where a compile-only analysis found the fp32
      head dim 128 loops issue-bound (its backward ran 10 TFLOP/s on an H100, PyTorch's 33). The same products
      and scalar steps, so the same bits; 2-4 KiB more static shared memory a loop (tensor_core.shared_bytes;
      a mask tile that no longer fits 48 KiB beside it is read from global memory, the same bits: dk/dv at head
      dim 192 with float64 masks, at 224 with bool and 16-bit ones). Compile-only (nvcc 13.0, sm_90, 255
      registers), SASS instructions of a warp's pass of the main loop: fp32 head dim 128 dq 6632 -> 4265 (HMMA
      480 -> 288, LDL/STL 23/13 -> 5/0), dk/dv 4604 -> 3216 and 3158 (the two warps' paths; HMMA 288 -> 192,
      LDL/STL 16/2 -> 11/0 and 0/0); with the fast split's fast path dq 4551 -> 2895, dk/dv 3449 -> 2344 and 2644;
      bf16 head dim 192 dq 1533 -> 1071, dk/dv 1502 -> 1216 and 1177. Two named barriers a step per pair added.
      On the H100, fp32 head dim 128 backward: +45-48% alone, +68-70% with the fast split (BENCHMARKS.md).
    tensor_core_dynamic_smem: the tensor_core dk/dv loops (the fused one too) take 32 queries a step where 48 KiB
      of static shared memory held only 16 (the fused loop at head dim 128, fp32 past 64, 16-bit past 224), their
      tiles in dynamic shared memory that the launch sizes past 48 KiB (tensor_core.DYNAMIC_SHARED at most, what
      every sm_80+ GPU gives a block) and the kernel's attribute allows. Half the steps, each its products
      twice as wide: the fused backward at head dim 128 ran 102 -> 94 TFLOP/s with 16 queries (bf16 L = 4096 on an
      H100; 64 -> fused 86 -> 102 at head dim 64 with 32), fp32's backward at head dim 128 10 TFLOP/s. The fused
      loop then takes 255 registers (two blocks an SM): ptxas 13.0 gives it 248 without spills, where the
      default cap of 168 spills 428 bytes (and 220 at 16 queries, the fused default's at head dim 128). fp32's
      32-query dk/dv loops spill more at 255 registers than its 16-query ones (head dim 96: 372 bytes against 4;
      128 with every option: 232 against 88), and yet at 128 the 32-query steps win: on the H200 (B = 4 L = 2048
      Hq * E = 1024) fp32's backward 17.2 -> 19.2 TFLOP/s, causal 16.6 -> 17.9; bf16 L = 4096 fused at head dim 128
      101.4 -> 107.3, causal 87.1 -> 91.2 (BENCHMARKS.md). On; fp32 at head dim 96 and 16-bit at 256 not yet
      timed with it.
    fused_backward_head_dim: the widest head dim (padded, tensor_core.head_dim_for; at most 128) whose 16-bit
      tensor_core backward runs in one kernel per key block (five tile products instead of the two kernels'
      seven), dQ added into an fp32 accumulator with atomics, so its bits vary run to run, as PyTorch's
      EFFICIENT_ATTENTION backward's do; a backward asked to be deterministic keeps the two kernels; 0: never
      (for fp32 too). 64 from the H100 (bf16 B=4 L=4096, BENCHMARKS.md): fused, the backward at head dim 64 ran
      86 -> 102 TFLOP/s (causal 84 -> 84), at 128 102 -> 94 (causal 104 -> 79). fp32 fuses at every head dim a warp
      takes in whole rows (up to 96; its D from a pass of the dq kernel without keys): its two kernels ran at the
      forward's rate a tile product, so seven products against five were its gap to PyTorch's. On the H100 (B = 4
      L = 2048 Hq * E = 1024, two runs a side): head dim 32 +10% (causal +7%), 64 23.1-23.8 -> 29.8-30.4 TFLOP/s
      (0.73-0.75x -> 0.95-0.96x PyTorch; causal 1.02-1.04x), 96 22.8-23.0 -> 30.9-32.1 (0.83x -> 1.10-1.12x; causal
      0.91x -> 1.13-1.15x). fp32 past 96 fuses too, on column parts (shared scores, dynamic shared memory; with
      tensor_core_dynamic_smem off it keeps the two kernels there): on the H100 (Hq * E = 1536) head dim 128 19.9 ->
      25.3 TFLOP/s (0.57x -> 0.74x PyTorch; causal 0.64x -> 0.77x).
    tensor_core_block_n: keys per tile of the tensor_core forward, 32 or 64 where its tiles fit (64-key tiles: head
      dims <= 128, <= 64 for fp32), 0 for the default (64 for 16-bit types up to head dim 128, else 32). At head dim
      128, 16-bit, 32-key tiles fit 168 registers without spills (ptxas: 132 bytes with 64), and yet they ran no
      faster on the H100 (bf16 B = 4 Hq * E = 2048: L = 1024 0.86-0.87x PyTorch either way, L = 4096 1-2% slower;
      BENCHMARKS.md), so the default stays.
    tensor_core_mask_tiles: the tensor_core loops (forward, dq, dk/dv) copy each tile's attn_mask elements into
      shared memory with their operand tiles (cp.async, ahead of their use), where the mask's rows are contiguous
      along the keys and 16-byte aligned and the tile fits 48 KiB beside the others (tensor_core.mask_tile_fits),
      instead of each thread loading its scores' elements from global memory when the scores are ready. On the
      H100 (bf16 B = 4 L = 4096 Hq * E = 2048): a (1, H, L, S) float mask's forward 0.56-0.64x -> 0.69-0.71x
      PyTorch's, its summed gradient 0.40-0.42x -> 0.47-0.51x; a (B, 1, L, S) bool mask's forward as without
      (0.73-0.76x), its backward at head dim 128 0.52x -> 0.58x, at 64 0.86x -> 0.83x (BENCHMARKS.md). Since the
      masked loops' per-score work was cut (a thread's two keys' elements read by one load, the visibility rule
      as four 32-bit compares; BENCHMARKS.md, forty-fifth and forty-sixth sessions, two runs): bool forward
      0.99-1.16x, backward 0.68-1.11x (0.68-0.83x at head dim 128); float forward 0.90-1.11x. Forty-eighth
      session: bool backward 1.29x at head dim 64 (the fused backward's passes coalesced), 0.93x at 128 (the dk/dv
      loop at 255 registers).
    tensor_core_mask_grad_sum: a float mask broadcast over batch, heads or queries (not keys), whose gradient sums
      dS over the scores that share an element, takes the tensor_core backward: the dq kernel adds each score's dS
      into a zeroed fp32 sum with atomics, then rounded into the mask's dtype. The order of the adds varies run to
      run, so a deterministic backward, and a mask broadcast over keys (whose rows of dS cancel to ~0, leaving only
      rounding: the portable kernels' fp64 sums keep it exact), stay on the portable kernels, which ran such a
      gradient at 1 TFLOP/s on the H100 (bf16 L = 4096, a (1, H, L, S) mask: 0.01x PyTorch); this path at 26-41
      TFLOP/s (0.40-0.42x, mask tiles off; 0.47-0.51x with them; 0.62-0.63x since a pair of adjacent sums takes
      one vector reduction and the masked loops' per-score work was cut; 0.57-0.62x in the next session's run;
      0.87-1.15x since its passes read rows coalesced and mask_order_group).
    head_major_grid: the tensor_core kernels' blocks in head-major order where every block of a head does the same
      work (no causal band or window; tensor_core.head_major): consecutive blocks take the query blocks (dk/dv:
      key blocks) of one (batch, head), so the blocks that read one head's K and V (Q and dO) run together and
      share them through the L2 cache, as PyTorch's EFFICIENT_ATTENTION orders its grid; else, and under a band,
      heads fastest, heaviest first, a head's blocks a wave apart. On the H100 (bf16, three runs a side at B = 4
      L = 4096 Hq * E = 2048): the forward at head dim 128 +11%, 64 +2.5%, the backward at 64 +5%, 128 +2%;
      under a causal band the backward at 128 lost 7% (and the forward at B = 16 L = 1024 head dim 64 lost 7%
      once), hence not there (BENCHMARKS.md).
    mask_order_group: with the head-major grid, the summed float-mask gradient's dq kernel runs up to this many of
      the slices that add into one sum (a summed batch or head dim) side by side for each row block
      (tensor_core.grid_order), so that their atomic adds meet in L2; 0 or 1: one slice's blocks in a row. The sums
      outgrow L2 (1 GB at L = S = 4096, 16 heads), so in a row each add is a round trip to memory. On the H100
      (bf16 B = 4 L = 4096 Hq * E = 2048, a (1, H, L, S) float mask, after the coalesced passes), 4 took that
      backward from 0.92x to 1.15x PyTorch's at head dim 64 and 0.79x to 0.87x at 128 (BENCHMARKS.md, forty-eighth
      session). Only the sums' dq kernel takes the order: grouping every kernel had cost a bool mask's forward 8%
      at 128 and gained the others nothing.
    prepared_launches: a call whose argument signature was seen launches each kernel through
      ``cuLaunchKernel`` with its arguments flattened (kernels_numba.launcher), not through Numba's
      dispatcher (on the H200, tests/test_efficient_gpu.py -k prepared; off: Numba's path for every call).

    The knobs are a context variable of the calling thread: torch runs a backward on its own thread, which
    sees the defaults (CuPy callers' ``attention_vjp`` runs it in theirs).
    """

    variant: str = "auto"
    smem_bytes: int = 40 * 1024
    threads: int = 16
    sub: int = 4
    chunk: int = 32
    prepared_launches: bool = True
    tensor_core_blocks: int = 3
    tensor_core_dkdv_blocks: int = 2
    tensor_core_dq_blocks: int = 0
    tensor_core_head_dim: int = 256
    tensor_core_fp32: bool = True
    tensor_core_fp32_fast_split: bool = True
    tensor_core_shared_scores: bool = True
    tensor_core_dynamic_smem: bool = True
    fused_backward_head_dim: int = 64
    tensor_core_block_n: int = 0
    tensor_core_mask_tiles: bool = True
    tensor_core_mask_grad_sum: bool = True
    head_major_grid: bool = True
    mask_order_group: int = 4

    @property
    def tensor_core_registers(self) -> int:
        """The tensor_core kernels' register cap (a multiple of 8, at most 255)."""
        return block_registers(self.tensor_core_blocks)

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant={self.variant!r} must be one of {VARIANTS}")
        if not 0 < self.smem_bytes <= 48 * 1024:
            raise ValueError(f"smem_bytes={self.smem_bytes} must be in (0, 49152]: Numba has no API to raise "
                             "the 48 KiB static shared-memory limit")
        if self.threads not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"threads={self.threads} must be a power of two <= 32 (threads**2 threads)")
        if self.tensor_core_head_dim not in (128, 160, 192, 224, 256):
            raise ValueError(f"tensor_core_head_dim={self.tensor_core_head_dim} must be 128, 160, 192, 224 or 256")
        if not 0 <= self.fused_backward_head_dim <= 128:
            raise ValueError(f"fused_backward_head_dim={self.fused_backward_head_dim} must be in [0, 128]")
        if self.tensor_core_block_n not in (0, 32, 64):
            raise ValueError(f"tensor_core_block_n={self.tensor_core_block_n} must be 0 (the default), 32 or 64")
        if not 2 <= self.tensor_core_blocks <= 4:
            raise ValueError(f"tensor_core_blocks={self.tensor_core_blocks} must be 2, 3 or 4")
        for name in ("tensor_core_dkdv_blocks", "tensor_core_dq_blocks"):
            if getattr(self, name) not in (0, 2, 3, 4):
                raise ValueError(f"{name}={getattr(self, name)} must be 0 (tensor_core_blocks'), 2, 3 or 4")
        if not 1 <= self.sub <= 8:
            raise ValueError(f"sub={self.sub} must be in [1, 8] (2 * sub**2 registers of score tiles)")
        if self.chunk < 1:
            raise ValueError(f"chunk={self.chunk} must be positive")
        if self.mask_order_group < 0:
            raise ValueError(f"mask_order_group={self.mask_order_group} must be >= 0 (0 or 1: no grouping)")

    @functools.cache  # noqa: B019 -- configs are few and frozen; a call asks up to three times
    def blocked_tiles(self, head_dim: int, head_dim_v: int, dkdv: bool) -> tuple[int, int, int]:
        """(sub_n, sub_m, rows) of a portable kernel (the dk/dv one when ``dkdv``, else the forward's and
        dq's, which keep a [keys, queries] tile of P or dS alike) for head dims rounded up to a multiple
        of threads; rows (a power of two, so it divides the reduced block) is what fits beside the
        weights tile in ``smem_bytes``."""
        g, widest = self.threads, max(head_dim, head_dim_v)
        sub_n = max(1, self.sub // 2) if dkdv and widest > 128 else self.sub
        block_n, block_m = g * sub_n, g * self.sub
        # the dk/dv kernel keeps P^T/dS^T as [BLOCK_M, BLOCK_N + 1] plus lse and delta; dq keeps dS as
        # [BLOCK_N, BLOCK_M + 1], the forward P so, plus two floats a query and one a key
        fixed = block_m * (block_n + 1) + 2 * block_m if dkdv else block_n * (block_m + 1) + 2 * block_m + block_n
        score = (block_n + block_m) * (self.chunk + 1)
        room = self.smem_bytes // 4 - fixed
        reduced = block_m if dkdv else block_n  # the rows a product's slices step through
        rows = min(reduced, self.chunk, max(1, room // (widest + 1)))
        # a power of two dividing the reduced block (sub = 3 makes it 48: slices of 32 would run past it)
        rows = min(1 << (rows.bit_length() - 1), reduced & -reduced)
        if fixed + max(score, rows * (widest + 1)) > self.smem_bytes // 4:
            raise ValueError(f"the portable kernels' tiles for head dim {widest} need more than smem_bytes="
                             f"{self.smem_bytes}; lower sub ({self.sub}) or chunk ({self.chunk})")
        return sub_n, self.sub, rows


def block_registers(blocks: int) -> int:
    """The register cap that leaves room for ``blocks`` 128-thread blocks per SM (a multiple of 8, at most 255)."""
    return min(255, 65536 // (128 * blocks) // 8 * 8)


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
