"""The tensor_core variant: thin Numba kernels around linked CUDA C tile loops, forward and backward.

Each Numba kernel resolves what differs per block (batch and head from the grid, GQA's kv head,
varlen sequence bounds, strided and broadcast operands) into row pointers and row strides, and
calls a C entry: ``efficient::forward`` in kernels_cuda/efficient_fwd.cuh (FlashAttention-2's tile loop on
mma.sync), ``efficient::backward_dq`` / ``backward_dkdv`` in efficient_bwd.cuh (its two backward kernels).
The C source is linked through ``cuda.declare_device(..., link=[CUSource], abi="c")``, one instantiation
(head dim, dtype, dropout or not, mask kind) per source, as FLASH compiles its kernels: NVRTC compiles only
what a problem needs, once per process, and no tile loop carries the code of features it does not use.
fp16/bf16 with E and Ev <= 256 (padded to 32/64/96/128/160/192/224/256; KernelConfig.tensor_core_head_dim), fp32 on TF32
tensor cores (three products of split operands, about fp32's accuracy) with E and Ev <= 128, forward and backward;
unit stride along the head dim; every mask kind, causal, window, dropout, GQA and varlen as in the portable
variant.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import cuda

import kernels_cuda

from . import config, device, dq_accumulate, launcher, layout
from .device import SIMULATOR
from .layout import cdiv

# The padded head dims (those past 128 up to KernelConfig.tensor_core_head_dim, 256 by default).
HEAD_DIMS = (32, 64, 96, 128, 160, 192, 224, 256)
BLOCK_M = 64  # 4 warps x 16 rows (efficient_fwd.cuh's EFF_BLOCK_M)
THREADS = 128
MASK_KINDS = {"bool": 1, "float16": 2, "bfloat16": 3, "float32": 4, "float64": 5}
# The C entry's parameters (efficient_fwd.cuh, EFF_NAME): pointers travel as int64 addresses.
_ARGS = ", ".join(["int64"] * 21 + ["float32"] + ["int64"] * 5 + ["float32"])

# The backward's C entries (efficient_bwd.cuh, EFF_NAME): 50 parameters, pointers as int64 addresses.
_BWD_ARGS = ", ".join(["int64"] * 37 + ["float32"] + ["int64"] * 8 + ["float32"] + ["int64"] * 3)


# The tile loops' element families (efficient_common.cuh's ElemKind): "float32" runs fp32 inputs as three TF32
# products of split operands (about fp32's accuracy, as PyTorch's EFFICIENT_ATTENTION does), "tf32" as one (only when
# the caller allowed TF32).
ELEMS = {"float16": 0, "bfloat16": 1, "float32": 2, "tf32": 3}
# fp32 tiles take twice the shared memory: the loops stop at head dim 128 (the forward with 32-key tiles).
FP32_HEAD_DIM = 128


def _wide(elem: str) -> bool:
    return elem in ("float32", "tf32")


def forward_block_n(head_dim: int, elem: str = "float16", preferred: int = 0) -> int:
    """Keys per shared-memory tile of the forward: ``preferred`` (KernelConfig.tensor_core_block_n) where its
    tiles fit, else by default 16-bit inputs 64 up to head dim 128 (K and V tiles of 64 x (128 + 8) halves,
    34 KiB), 32 past it (head dim 256: 33 KiB of the 48 KiB of static shared memory); fp32 32 (head dim 128:
    34 KiB; ptxas 13.0 at 168 registers: no spills at head dims 64 and 96, where 64-key tiles spilled 76 bytes
    at 64). 64-key tiles fit up to head dim 128 (16-bit) or 64 (fp32)."""
    if preferred == 64 and head_dim <= (64 if _wide(elem) else 128):
        return 64
    if preferred == 32:
        return 32
    return 32 if _wide(elem) else 64 if head_dim <= 128 else 32


STATIC_SHARED = launcher.STATIC_SHARED  # the most static shared memory a block may declare (Numba's linked C's)
# The most dynamic shared memory every sm_80+ GPU gives a block (sm_86 and sm_89: 99 KiB; sm_80 163, sm_90 227),
# which the dk/dv loops may take with KernelConfig.tensor_core_dynamic_smem.
DYNAMIC_SHARED = 99 * 1024


def shared_bytes(head_dim: int, elem: str, kind: str, block: int, parts: int = 1, mask_kind: int = 0,
                 shared_scores: bool = False) -> int:
    """A tile loop's static shared memory: its operand tiles (rows of head_dim elements, padded by 16 bytes) and,
    with ``mask_kind``, a mask tile (efficient_common.cuh's MaskTile: rows of the mask's elements, +16 bytes a
    row). ``block``: the forward's and dq's keys per tile, dk/dv's queries per step; the forward's and dq's mask
    tile is their rows by ``block`` keys, dk/dv's ``block`` queries by its block's keys. ``shared_scores`` (dq and
    dk/dv with column parts): the pairs' exchange buffer too (efficient_bwd.cuh's ScoreSwap: per row group of
    warps, 16 bytes a lane for each of the ``block / 8`` n8 tiles, twice that for fp32's dk/dv, whose two
    operands of four words each take two)."""
    element = 4 if _wide(elem) else 2
    row = (head_dim + 16 // element) * element
    mask_bytes = {0: 0, 1: 1, 2: 2, 3: 2, 4: 4, 5: 8}[mask_kind]
    rows = backward_rows(parts)
    swap = 0
    if shared_scores and parts == 2 and kind in ("dq", "dkdv", "fused"):
        swap = (THREADS // 32 // parts) * (block // 8) * 32 * 16 * (2 if kind != "dq" and _wide(elem) else 1)
    if kind == "forward":  # K and V tiles, the keys-seen words (4 x 4 u32)
        return 2 * block * row + 64 + (BLOCK_M * (block * mask_bytes + 16) if mask_kind else 0)
    if kind == "dq":  # K and V tiles
        return 2 * block * row + swap + (rows * (block * mask_bytes + 16) if mask_kind else 0)
    # dk/dv: V rows, the step's Q and dO tiles, lse and D, the dead rows' word; fused, K rows too and the dS tile
    used = (2 if kind == "fused" else 1) * rows * row + 2 * block * row + 8 * block + 4
    if kind == "fused":
        used += block * (rows + 16 // element) * element
    return used + swap + (block * (rows * mask_bytes + 16) if mask_kind else 0)


def mask_tile_fits(head_dim: int, elem: str, kind: str, block: int, mask_kind: int, parts: int = 1,
                   shared_scores: bool = False, limit: int = STATIC_SHARED) -> bool:
    """Whether a tile loop's shared memory (``limit`` bytes) holds a mask tile beside its operand tiles
    (shared_bytes)."""
    return bool(mask_kind) and shared_bytes(head_dim, elem, kind, block, parts, mask_kind, shared_scores) <= limit


def dq_block_n(head_dim: int, elem: str = "float16") -> int:
    """Keys per tile of the dq kernel: 32 over head dim 64 keeps S and dP (2 x 16 registers) beside Q, dO and
    dQ's fragments (3 x head_dim / 4, twice that for fp32, which takes 32 always: 16 bytes of spills at head
    dim 64 where 64 keys spilled 132); 16 past head dim 192 (16-bit, column parts, 255 registers: no spills,
    where 32 keys spilled 16 bytes at 224 and 80 at 256)."""
    return 64 if head_dim <= 64 and not _wide(elem) else 16 if head_dim > 192 and not _wide(elem) else 32


def col_parts(head_dim: int, elem: str = "float16") -> int:
    """Warps per 16 rows of a backward block, each accumulating that share of the gradient's columns
    (efficient_bwd.cuh's EFF_COL_PARTS): 2 where a thread's three head-dim-wide fragment sets (Q, dO, dQ; K,
    dK, dV) would not fit its registers, past head dim 128 (fp32: 96), else 1. At head dims that fit whole rows
    two parts were slower although they spill less (the H100, bf16 L = 4096: the backward at head dim 128 103 ->
    74 TFLOP/s, at 64 87 -> 50; BENCHMARKS.md)."""
    return 2 if head_dim > (96 if _wide(elem) else 128) else 1


def backward_rows(parts: int) -> int:
    """Query rows of a dq block, key rows of a dk/dv block: 16 per row group of warps, ``parts`` warps a
    group."""
    return 16 * (THREADS // 32) // parts


def dkdv_block_m(head_dim: int, elem: str = "float16", fused: bool = False, dynamic: bool = False) -> int:
    """Queries per step of the dk/dv kernel: 32; 16 where the Q and dO tiles would not fit 48 KiB beside the
    block's V rows: fp32 past head dim 64 and fused (its K rows and dS tile too: 60 KiB at 32 queries, head dim
    64), 16-bit at 256 (32 V rows), the fused kernel at head dim 128 (46 KiB); with ``dynamic`` shared memory
    (KernelConfig.tensor_core_dynamic_smem) 32 everywhere (at most 86 KiB: fp32 fused at head dim 96)."""
    if dynamic:
        return 32
    return 16 if (_wide(elem) and (head_dim > 64 or fused)) or head_dim > 224 or (fused and head_dim > 96) else 32


def takes_dynamic(head_dim: int, elem: str, kind: str, dynamic: bool) -> bool:
    """Whether a tile loop puts its tiles in dynamic shared memory: ``dynamic`` asked for, a dk/dv loop, and its
    steps then larger than static memory allowed."""
    fused = kind == "fused"
    return dynamic and kind in ("dkdv", "fused") and \
        dkdv_block_m(head_dim, elem, fused, True) != dkdv_block_m(head_dim, elem, fused)


def _loop_choices(head_dim: int, elem: str, kind: str, mask_kind: int, block_n: int, mask_tile: bool,
                  shared_scores: bool, dynamic: bool) -> tuple:
    """(block, mask_tile, shared_scores, dynamic) as a tile loop is built from what was asked for: the one place
    that decides them, for tile_loop_source and for the shared memory a launch gives it (dynamic_bytes)."""
    parts = col_parts(head_dim, elem)
    dynamic = takes_dynamic(head_dim, elem, kind, dynamic)
    block = {"forward": forward_block_n(head_dim, elem, block_n), "dq": dq_block_n(head_dim, elem),
             "dkdv": dkdv_block_m(head_dim, elem, False, dynamic),
             "fused": dkdv_block_m(head_dim, elem, True, dynamic)}[kind]
    shared_scores = shared_scores and parts == 2 and kind in ("dq", "dkdv", "fused")
    mask_tile = mask_tile and mask_tile_fits(head_dim, elem, kind, block, mask_kind, parts, shared_scores,
                                             DYNAMIC_SHARED if dynamic else STATIC_SHARED)
    return block, mask_tile, shared_scores, dynamic


def dynamic_bytes(head_dim: int, elem: str, kind: str, mask_kind: int, mask_tile: bool,
                  shared_scores: bool) -> int:
    """The dynamic shared memory a dk/dv loop that takes it (takes_dynamic) is launched with, for the knobs
    asked for: its tiles (shared_bytes, the mask tile where one is staged) and 16 bytes a piece of slack for the
    carving's alignment."""
    block, tiled, shared_scores, _ = _loop_choices(head_dim, elem, kind, mask_kind, 0, mask_tile, shared_scores,
                                                   True)
    return shared_bytes(head_dim, elem, kind, block, col_parts(head_dim, elem), mask_kind if tiled else 0,
                        shared_scores) + 8 * 16


def registers_for(head_dim: int, elem: str, cap: int, forward: bool) -> int:
    """A tile loop's register cap: ``cap`` (KernelConfig.tensor_core_registers) up to head dim 128, past it 255,
    two blocks per SM (ptxas 13.0, 16-bit forward: 218 at 160, 242 at 192, 255 at 256, no spills, where 168
    spilled 100-1644 bytes; the backward's column parts likewise). fp32's fragments take a register per element:
    its backward loops take 255 past head dim 64 (at 96: no spills, where 168 spilled 192-196 bytes); its forward
    keeps ``cap`` (at 168: 0 bytes of spills at 64 and 96, 56 at 32, 96 at 128; 255 spilled as much, at two
    blocks per SM)."""
    if _wide(elem):
        return cap if forward or head_dim <= 64 else 255
    return cap if head_dim <= 128 else 255


def elem_of(pr) -> str:
    """The tile loops' element family for ``pr``'s inputs: fp32 as "tf32" where the caller allowed TF32."""
    name = layout.dtype_name(pr.dtype)
    return "tf32" if name == "float32" and pr.allow_tf32 else name


def reasons(pr, cfg) -> list[str]:
    """Why the tensor_core variant cannot run ``pr``'s forward under the knobs ``cfg`` (a KernelConfig: head dims
    up to its tensor_core_head_dim, fp32 only with its tensor_core_fp32); empty: it can."""
    out = []
    if SIMULATOR:
        return ["the CUDA simulator cannot run linked CUDA C (the tensor_core variant)"]
    if pr.xp is np:
        out.append("the tensor_core variant takes GPU arrays")
    widest = cfg.tensor_core_head_dim
    if pr.dtype.name == "float32" and cfg.tensor_core_fp32:
        widest = min(widest, FP32_HEAD_DIM)
    elif pr.dtype.name not in ("float16", "bfloat16"):
        out.append(f"the tensor_core variant takes float16/bfloat16{'/float32' * cfg.tensor_core_fp32}, not "
                   f"{pr.dtype.name}")
    if max(pr.E, pr.Ev) > widest:
        out.append(f"the tensor_core variant takes {pr.dtype.name} head dims up to {widest}, got E={pr.E}, "
                   f"Ev={pr.Ev}")
    for name, x in (("query", pr.q), ("key", pr.k), ("value", pr.v)):
        if x.shape[-1] > 1 and x.strides[-1] != x.itemsize:
            out.append(f"the tensor_core variant needs unit stride along the head dim of {name}")
    if pr.mask_kind == "float" and pr.mask.dtype.name not in MASK_KINDS:
        out.append(f"the tensor_core variant reads float masks of {'/'.join(MASK_KINDS)}, not {pr.mask.dtype}")
    return out


def head_dim_for(E: int, Ev: int) -> int:
    return next(d for d in HEAD_DIMS if d >= max(E, Ev))


def tile_loop_source(head_dim: int, elem: str, kind: str, dropout: bool, mask_kind: int,
                     block_n: int = 0, mask_tile: bool = False, fast_split: bool = False,
                     shared_scores: bool = False, dynamic: bool = False,
                     mask_grad_sum: bool = False) -> tuple[str, str]:
    """(C entry name, CUDA source) of one tile loop: ``kind`` "forward", "dq", "dkdv" or "fused" (dk/dv with dQ
    added into an fp32 accumulator, whole rows per warp), for a padded head dim of HEAD_DIMS and an element family of
    ELEMS, with dropout or not and a mask of kind ``mask_kind`` (MASK_KINDS' numbers, 0: none) compiled in;
    ``block_n``: the forward's keys per tile (0: forward_block_n's default; the backward's column parts:
    col_parts); ``mask_tile``: the loop stages its mask tiles in shared memory where they fit (mask_tile_fits;
    KernelConfig.tensor_core_mask_tiles); ``fast_split``: fp32's products split the elements of tiles that landed
    finite in 4 instructions (efficient_common.cuh's EFF_FAST_SPLIT; KernelConfig.tensor_core_fp32_fast_split);
    ``shared_scores``: where the backward takes column parts (dq, dk/dv), the pair splits the score products
    and trades them through shared memory (efficient_bwd.cuh's EFF_SHARE_SCORES;
    KernelConfig.tensor_core_shared_scores); ``dynamic``: a dk/dv loop whose steps static memory kept at 16
    queries takes 32, its tiles in dynamic shared memory (takes_dynamic; EFF_DYNAMIC_SMEM;
    KernelConfig.tensor_core_dynamic_smem); ``mask_grad_sum``: a dq loop with a float mask adds each score's dS into
    fp32 sums its broadcast elements share (EFF_DMASK_ADD; KernelConfig.tensor_core_mask_grad_sum). tests/test_flash.py
    compiles them with NVRTC on the CPU."""
    short = {"float16": "f16", "bfloat16": "bf16", "float32": "f32", "tf32": "tf32"}[elem]
    parts = col_parts(head_dim, elem)
    block_n, mask_tile, shared_scores, dynamic = _loop_choices(head_dim, elem, kind, mask_kind, block_n, mask_tile,
                                                               shared_scores, dynamic)
    fast_split = fast_split and elem == "float32"
    mask_grad_sum = mask_grad_sum and kind == "dq" and mask_kind > MASK_KINDS["bool"]
    name = (f"efficient_{kind}_{short}_d{head_dim}_n{block_n}{'_dropout' if dropout else ''}_mask{mask_kind}"
            f"{f'_p{parts}' if parts > 1 and kind != 'forward' else ''}{'_mt' if mask_tile else ''}"
            f"{'_fs' if fast_split else ''}{'_ss' if shared_scores else ''}{'_dyn' if dynamic else ''}"
            f"{'_ms' if mask_grad_sum else ''}")
    defines_tile = (f"#define EFF_MASK_TILE {int(mask_tile)}\n#define EFF_FAST_SPLIT {int(fast_split)}\n"
                    + ("#define EFF_DYNAMIC_SMEM 1\n" if dynamic else ""))
    defines = (f"#define EFF_NAME {name}\n#define EFF_HEAD_DIM {head_dim}\n#define EFF_BLOCK_N {block_n}\n"
               f"#define EFF_ELEM {ELEMS[elem]}\n#define EFF_DROPOUT {int(dropout)}\n"
               f"#define EFF_MASK_KIND {mask_kind}\n")
    if kind == "forward":
        return name, defines + defines_tile + kernels_cuda.source("efficient_fwd.cuh")
    return name, (defines + f"#define EFF_DQ {int(kind == 'dq')}\n#define EFF_FUSED {int(kind == 'fused')}\n"
                  f"#define EFF_COL_PARTS {parts}\n" + defines_tile +
                  ("#define EFF_SHARE_SCORES 1\n" if shared_scores else "") +
                  ("#define EFF_DMASK_ADD 1\n" if mask_grad_sum else "") +
                  kernels_cuda.source("efficient_bwd.cuh"))


@functools.cache
def _tile_loop(head_dim: int, elem: str, kind: str, dropout: bool, mask_kind: int, block_n: int = 0,
               mask_tile: bool = False, fast_split: bool = False, shared_scores: bool = False, dynamic: bool = False,
               mask_grad_sum: bool = False):
    name, source = tile_loop_source(head_dim, elem, kind, dropout, mask_kind, block_n, mask_tile, fast_split,
                                    shared_scores, dynamic, mask_grad_sum)
    args = _ARGS if kind == "forward" else _BWD_ARGS
    return cuda.declare_device(name, f"int32({args})", link=[cuda.CUSource(source, name=f"{name}.cu")], abi="c")


@device.inline
def _slice_of(flat, varlen, cu_q, cu_k, nb1, nb2, L, S):
    """(b0, b1, b2, first query row, first key row, L, S) of flat problem batch element ``flat`` (varlen: of
    sequence ``flat``, its rows from cu_seqlens)."""
    if varlen:
        q0 = np.int64(cu_q[flat])
        k0 = np.int64(cu_k[flat])
        return np.int64(0), np.int64(0), np.int64(0), q0, k0, np.int64(cu_q[flat + 1]) - q0, np.int64(cu_k[flat + 1]) - k0
    return flat // (nb1 * nb2), (flat // nb2) % nb1, flat % nb2, np.int64(0), np.int64(0), np.int64(L), np.int64(S)


@device.inline
def _at(base, itemsize, st, b0, b1, b2, h, row):
    """The address of row ``row`` of head ``h`` of batch element (b0, b1, b2) of an operand at ``base`` with
    element strides ``st`` over (B0, B1, B2, H, row)."""
    return base + itemsize * (b0 * st[0] + b1 * st[1] + b2 * st[2] + h * st[3] + row * st[4])


@device.inline
def _block_of(head_major, rows, extent, x, y, grid_y, n, stride):
    """(slice, first row) of block (x, y) of a grid grid_y high: slice = batch * heads + head, its blocks of
    ``rows`` rows over ``extent`` rows, heaviest first (descending when ``rows`` is negative: the last query
    blocks see the most keys under a causal band; ascending for key blocks). ``head_major``: one 1-D grid whose
    consecutive blocks take one slice's row blocks, so the blocks that read one head's K and V (Q and dO) run
    together and share them through L2 -- or, with a group of ``n`` slices ``stride`` apart (``grid_order``), the
    group's slices side by side for each row block; (1, 1) is one slice's blocks in a row, a compile-time constant
    where the callers pass it. Else a (slices, row blocks) grid, slices fastest. Block indices come as arguments:
    the simulator swaps ``cuda`` for its own module in kernels, not in device functions."""
    step = abs(rows)
    if head_major:
        count = (extent + step - 1) // step
        group, rest = x // (n * count), x % (n * count)
        block, member = rest // n, rest % n
        slice_ = ((group // stride) * n + member) * stride + group % stride
    else:
        count, slice_, block = grid_y, x, y
    return slice_, (count - 1 - block if rows < 0 else block) * step


def head_major(pr, cfg) -> bool:
    """Whether ``pr``'s tensor_core kernels take the head-major grid (``_block_of``): KernelConfig.head_major_grid
    where every block of a head does the same work -- no causal band or window -- so that a head's blocks run
    together and share its K and V (Q and dO) through L2. Under a band the heads-fastest grid, every head's
    heaviest blocks first, balanced better (bf16 on an H100: head-major lost 7% in the causal backward at L = 4096
    E = 128 and in the causal forward at B = 16 L = 1024 E = 64, where it gained 2-13% without a band;
    BENCHMARKS.md)."""
    return cfg.head_major_grid and pr.window_bounds == (-1, -1)


def _grid(slices: int, rows: int, extent: int, head_major: bool) -> tuple:
    """The grid of ``_block_of``."""
    return (slices * cdiv(extent, rows), 1) if head_major else (slices, cdiv(extent, rows))


def grid_order(sums, most: int) -> tuple:
    """``_block_of``'s group (n, stride) for the dq kernel that adds a float mask's dS into fp32 ``sums`` (a 6-D
    view with zero strides along the dims it sums over): up to ``most`` slices (KernelConfig.mask_order_group) of
    one summed dim, the heads' or else the innermost batch dim's, run each row block side by side. Their adds into
    one sum then meet in L2, where one slice's blocks in a row leave the next slice's add to a line long evicted
    (1 GB of sums at L = S = 4096 and 16 heads). n divides the dim so that groups tile the slices; (1, 1) where
    nothing is summed over the slices or ``most`` < 2."""
    _, nb1, nb2, hq = sums.shape[:4]
    slice_strides = (hq * nb1 * nb2, hq * nb2, hq, 1)  # of B0, B1, B2, H in bh
    for dim in (3, 2, 1, 0):
        size = sums.shape[dim]
        if sums.strides[dim] == 0 and size > 1 and most > 1:
            n = max(d for d in range(1, min(most, size) + 1) if size % d == 0)
            return n, slice_strides[dim]
    return 1, 1


@functools.cache
def _kernel(head_dim: int, elem: str, dropout: bool, mask_kind: int, registers: int, block_n: int,
            head_major: bool, mask_tile: bool = False, fast_split: bool = False):
    tile_loop = _tile_loop(head_dim, elem, "forward", dropout, mask_kind, block_n, mask_tile, fast_split)
    size = 4 if _wide(elem) else 2  # bytes per element of q, k, v and out

    @cuda.jit(max_registers=registers)
    def attention_forward_tc(q, qs, k, ks, v, vs, out, os_, lse, ls, mask, ms, cu_q, cu_k, varlen, nb1, nb2, hq,
                             group, L, S, E, Ev, scale, lower_right, left, right, seed_lo, seed_hi, offset, threshold,
                             rescale):
        """One block per (batch-head, 64 query rows); q/k/v/out/lse/mask are base addresses and
        qs/ks/... their element strides over (B0, B1, B2, H, row[, col]); causal comes folded into
        (left, right) as the window around the diagonal (Problem.window_bounds)."""
        # the last query blocks first: under a causal band they see the most keys, and blocks start in grid
        # order, so the heavy ones start first rather than forming the tail (FlashAttention-2's order)
        bh, m_first = _block_of(head_major, -BLOCK_M, L, cuda.blockIdx.x, cuda.blockIdx.y, cuda.gridDim.y, 1, 1)
        h = bh % hq
        hk = h // group
        flat = bh // hq
        b0, b1, b2, q0, k0, L_b, S_b = _slice_of(flat, varlen, cu_q, cu_k, nb1, nb2, L, S)
        if m_first >= L_b:
            return
        q_at, out_at = _at(q, size, qs, b0, b1, b2, h, q0), _at(out, size, os_, b0, b1, b2, h, q0)
        k_at, v_at = _at(k, size, ks, b0, b1, b2, hk, k0), _at(v, size, vs, b0, b1, b2, hk, k0)
        lse_at = _at(lse, 4, ls, b0, b1, b2, h, q0)
        mask_at = _at(mask, ms[6], ms, b0, b1, b2, h, 0)
        shift = S_b - L_b if lower_right else 0
        tile_loop(q_at, qs[4], k_at, ks[4], v_at, vs[4], out_at, os_[4], lse_at, ls[4], mask_at, ms[4], ms[5],
                  m_first, L_b, S_b, E, Ev, shift, left, right, np.float32(scale), bh,
                  seed_lo, seed_hi, offset, threshold, np.float32(rescale))

    return attention_forward_tc


def _address_and_strides(x):
    """(data address, element strides) of a CuPy array (a view's address is its element 0)."""
    return int(x.data.ptr), tuple(int(s) // x.itemsize for s in x.strides)


def forward(pr, views, out_v, lse_v, device, structure, cfg):
    """Launch the tensor_core forward into out_v (6-D) and lse_v (5-D) views; see attention.forward. ``cfg``:
    the KernelConfig (register cap, preferred keys per tile, block order)."""
    _, _, left, right, seed_lo, seed_hi, offset, threshold, rescale = structure
    head_dim, elem = head_dim_for(pr.E, pr.Ev), elem_of(pr)
    kernel = _kernel(head_dim, elem, pr.dropout_p > 0, mask_kind_of(pr),
                     registers_for(head_dim, elem, cfg.tensor_core_registers, forward=True),
                     forward_block_n(head_dim, elem, cfg.tensor_core_block_n), head_major(pr, cfg),
                     cfg.tensor_core_mask_tiles and pr.mask_kind is not None, cfg.tensor_core_fp32_fast_split)
    q, qs = _address_and_strides(views.q)
    k, ks = _address_and_strides(views.k)
    v, vs = _address_and_strides(views.v)
    out, os_ = _address_and_strides(out_v)
    lse, ls = _address_and_strides(lse_v)
    mask, ms = _address_and_strides(views.mask)
    ms = ms + (views.mask.itemsize,)
    varlen = pr.varlen is not None
    grid = _grid(views.n_batch * pr.hq, BLOCK_M, pr.L, head_major(pr, cfg))
    launcher.launch(kernel, grid, THREADS, device,
                    (q, qs[:5], k, ks[:5], v, vs[:5], out, os_[:5], lse, ls, mask, ms, views.cu_q, views.cu_k, varlen,
                     views.nb1, views.nb2, pr.hq, pr.group, pr.L, pr.S, pr.E, pr.Ev, pr.scale, pr.lower_right, left,
                     right, seed_lo, seed_hi, offset, threshold, rescale))


def mask_kind_of(pr) -> int:
    """The tile loops' number of ``pr``'s mask kind (efficient_common.cuh's MaskKind; 0: no mask)."""
    if pr.mask_kind is None:
        return 0
    return MASK_KINDS["bool" if pr.mask_kind == "bool" else layout.dtype_name(pr.mask.dtype)]


@device.inline
def _given_order(order):
    return order[0], order[1]


@device.inline
def _one_slice_order(order):
    return 1, 1


@functools.cache
def _dq_kernel(head_dim: int, elem: str, dropout: bool, mask_kind: int, registers: int, head_major: bool, parts: int,
               mask_tile: bool = False, fast_split: bool = False, shared_scores: bool = False,
               mask_grad_sum: bool = False):
    tile_loop = _tile_loop(head_dim, elem, "dq", dropout, mask_kind, 0, mask_tile, fast_split, shared_scores,
                           mask_grad_sum=mask_grad_sum)
    size = 4 if _wide(elem) else 2
    rows = backward_rows(parts)
    group_of = _given_order if mask_grad_sum else _one_slice_order  # (constants 1, 1 fold into the decode)

    @cuda.jit(max_registers=registers)
    def attention_dq_tc(q, qs, k, ks, v, vs, dout, dos, out, os_, lse, ls, delta, dls, dq, dqs, dmask, dms, mask, ms,
                        cu_q, cu_k, varlen, nb1, nb2, hq, group, L, S, E, Ev, scale, lower_right, left, right,
                        seed_lo, seed_hi, offset, threshold, rescale, keys, order):
        """One block per (batch-head, ``rows`` query rows); writes D and, where dmask is not 0 (an address), the
        float mask's gradient of each score (``mask_grad_sum``: adds it into fp32 sums). ``keys`` 0: D alone (the
        fused fp32 backward's D pass), the slice taken as holding no keys, so that no key block runs and dQ's rows
        are written as zeros. ``order``: the summed gradient's slice group (grid_order), else unread."""
        # the heaviest (causal) blocks first
        n, stride = group_of(order)
        bh, m_first = _block_of(head_major, -rows, L, cuda.blockIdx.x, cuda.blockIdx.y, cuda.gridDim.y, n, stride)
        h = bh % hq
        hk = h // group
        flat = bh // hq
        b0, b1, b2, q0, k0, L_b, S_b = _slice_of(flat, varlen, cu_q, cu_k, nb1, nb2, L, S)
        if m_first >= L_b:
            return
        q_at, do_at = _at(q, size, qs, b0, b1, b2, h, q0), _at(dout, size, dos, b0, b1, b2, h, q0)
        out_at = _at(out, size, os_, b0, b1, b2, h, q0)
        k_at, v_at = _at(k, size, ks, b0, b1, b2, hk, k0), _at(v, size, vs, b0, b1, b2, hk, k0)
        lse_at, delta_at = _at(lse, 4, ls, b0, b1, b2, h, q0), _at(delta, 4, dls, b0, b1, b2, h, q0)
        dq_at = _at(dq, size, dqs, b0, b1, b2, h, q0)
        dmask_at = dmask
        if dmask != 0:
            dmask_at = _at(dmask, dms[6], dms, b0, b1, b2, h, 0)
        mask_at = _at(mask, ms[6], ms, b0, b1, b2, h, 0)
        shift = S_b - L_b if lower_right else 0
        keys_b = S_b if keys else 0
        tile_loop(q_at, qs[4], k_at, ks[4], v_at, vs[4], do_at, dos[4], out_at, os_[4], lse_at, ls[4], delta_at,
                  dls[4], dq_at, dqs[4], 0, 0, dmask_at, dms[4], dms[5], mask_at, ms[4], ms[5], 0, 0, 0, 0, 0,
                  m_first, L_b, keys_b, E, Ev, shift, left, right, np.float32(scale), bh, 1, 1, 1, seed_lo,
                  seed_hi, offset, threshold, np.float32(rescale), 0, 0, 0)

    return attention_dq_tc


@functools.cache
def _dkdv_kernel(head_dim: int, elem: str, dropout: bool, mask_kind: int, registers: int, head_major: bool,
                 parts: int, mask_tile: bool, fast_split: bool, fused: bool, shared_scores: bool = False,
                 dynamic: bool = False):
    tile_loop = _tile_loop(head_dim, elem, "fused" if fused else "dkdv", dropout, mask_kind, 0, mask_tile, fast_split,
                           shared_scores, dynamic)
    size = 4 if _wide(elem) else 2
    rows = backward_rows(parts)

    @cuda.jit(max_registers=registers)
    def attention_dkdv_tc(q, qs, k, ks, v, vs, dout, dos, lse, ls, delta, dls, dk, dks, dv, dvs, mask, ms, dqa, dqas,
                          cu_q, cu_k, varlen, nb1, nb2, hq, hkv, group, L, S, E, Ev, scale, lower_right, left, right,
                          seed_lo, seed_hi, offset, threshold, rescale):
        """One block per (batch, kv head, ``rows`` keys), over the query heads of its GQA group; fused: dQ added
        into the fp32 accumulator at dqa (element strides dqas) too."""
        # the first key blocks (the heaviest under a causal band) first
        pair, n_first = _block_of(head_major, rows, S, cuda.blockIdx.x, cuda.blockIdx.y, cuda.gridDim.y, 1, 1)
        hk = pair % hkv
        flat = pair // hkv
        b0, b1, b2, q0, k0, L_b, S_b = _slice_of(flat, varlen, cu_q, cu_k, nb1, nb2, L, S)
        if n_first >= S_b:
            return
        h0 = hk * group
        q_at, do_at = _at(q, size, qs, b0, b1, b2, h0, q0), _at(dout, size, dos, b0, b1, b2, h0, q0)
        lse_at, delta_at = _at(lse, 4, ls, b0, b1, b2, h0, q0), _at(delta, 4, dls, b0, b1, b2, h0, q0)
        k_at, v_at = _at(k, size, ks, b0, b1, b2, hk, k0), _at(v, size, vs, b0, b1, b2, hk, k0)
        dk_at, dv_at = _at(dk, size, dks, b0, b1, b2, hk, k0), _at(dv, size, dvs, b0, b1, b2, hk, k0)
        mask_at = _at(mask, ms[6], ms, b0, b1, b2, h0, 0)
        dqa_at = _at(dqa, 4, dqas, b0, b1, b2, h0, q0)
        shift = S_b - L_b if lower_right else 0
        tile_loop(q_at, qs[4], k_at, ks[4], v_at, vs[4], do_at, dos[4], 0, 0, lse_at, ls[4], delta_at, dls[4], dk_at,
                  dks[4], dv_at, dvs[4], 0, 0, 0, mask_at, ms[4], ms[5], qs[3], dos[3], ls[3], dls[3], ms[3],
                  n_first, L_b, S_b, E, Ev, shift, left, right, np.float32(scale), flat * hq + h0, group,
                  1, 1, seed_lo, seed_hi, offset, threshold, np.float32(rescale), dqa_at, dqas[4], dqas[3])

    return attention_dkdv_tc


def backward(pr, views, arrays, dmask_v, device, structure, cfg, dq_accum=None, mask_grad_sum=False):
    """Launch the tensor_core backward: ``arrays`` are the 6-D (5-D for lse and delta) views dout, out, lse,
    delta, dq, dk, dv, with one own batch element per problem batch element (attention.backward checks);
    dmask_v the float mask's gradient where each element belongs to one score, or with ``mask_grad_sum`` zeroed
    fp32 sums viewed over every score (zero strides along the mask's broadcast dims) that the dq kernel adds each
    score's dS into; else None.

    With ``dq_accum`` (a 6-D fp32 view shaped like dq with the padded head dim, no dmask_v): the fused kernel,
    between a pre-pass (D, the accumulator zeroed: 16-bit types by dq_accumulate, fp32 by the dq kernel without
    its keys, whose D is exact where a row sees one key) and a post-pass (dq from it); else the dq kernel, then
    the dk/dv kernel."""
    _, _, left, right, seed_lo, seed_hi, offset, threshold, rescale = structure
    head_dim, elem = head_dim_for(pr.E, pr.Ev), elem_of(pr)
    fused = dq_accum is not None
    parts = col_parts(head_dim, elem)  # (fused: 1, or 2 for fp32 past head dim 96)
    major = head_major(pr, cfg)
    instance = (head_dim, elem, pr.dropout_p > 0, mask_kind_of(pr),
                registers_for(head_dim, elem, cfg.tensor_core_registers, forward=False), major, parts,
                cfg.tensor_core_mask_tiles and pr.mask_kind is not None, cfg.tensor_core_fp32_fast_split)
    shared_scores = cfg.tensor_core_shared_scores and parts == 2  # (tile_loop_source checks too)
    (q, qs), (k, ks), (v, vs), (mask, ms) = (_address_and_strides(x) for x in (views.q, views.k, views.v, views.mask))
    (dout, dos), (out, os_), (lse, ls), (delta, dls), (dq, dqs), (dk, dks), (dv, dvs) = (
        _address_and_strides(x) for x in arrays)
    ms = ms + (views.mask.itemsize,)
    dmask, dms = 0, (0,) * 7
    if dmask_v is not None:
        dmask, dms = _address_and_strides(dmask_v)
        dms = dms + (dmask_v.itemsize,)
        if mask_grad_sum and dms[5] != 1:  # (the dq loop finds a score pair's sums at its row's plus the key)
            raise ValueError(f"the summed float-mask gradient's fp32 sums must be contiguous along the keys; their "
                             f"element strides are {dms[:6]}")
    varlen = pr.varlen is not None
    common = (views.cu_q, views.cu_k, varlen, views.nb1, views.nb2)
    tail = (pr.L, pr.S, pr.E, pr.Ev, pr.scale, pr.lower_right, left, right, seed_lo, seed_hi, offset, threshold, rescale)
    rows = backward_rows(parts)
    order = grid_order(dmask_v, cfg.mask_order_group) if mask_grad_sum and major and not varlen else (1, 1)

    # the 16-bit loops apart (not fused) at head dim 128, whose accumulators spill at 168 registers, may take their
    # own register caps (at 96 they spill a quarter as much: not measured)
    own_caps = not fused and not _wide(elem) and head_dim == 128

    def capped(blocks):  # ``instance`` at the register cap of ``blocks`` blocks an SM, 0: as it is
        return instance[:4] + (config.block_registers(blocks),) + instance[5:] if own_caps and blocks else instance

    def dq_kernel(into, strides, keys):  # the dq kernel, writing dQ's rows at ``into``
        launcher.launch(_dq_kernel(*capped(cfg.tensor_core_dq_blocks), shared_scores, mask_grad_sum),
                        _grid(views.n_batch * pr.hq, rows, pr.L, major), THREADS, device,
                        (q, qs[:5], k, ks[:5], v, vs[:5], dout, dos[:5], out, os_[:5], lse, ls, delta, dls, into,
                         strides[:5], dmask, dms, mask, ms, *common, pr.hq, pr.group, *tail, keys, order))

    if fused:
        bf16 = elem == "bfloat16"
        dout_v, out_v, _, delta_v, dq_v = arrays[:5]
        passes, cols = dq_accumulate.launch_shape(dq_accum)
        dqa, dqas = _address_and_strides(dq_accum)
        if _wide(elem):  # fp32's D as the dq kernel takes it (on dP's fragments: exact where a row sees one key)
            dq_kernel(dqa, dqas, 0)
        else:
            launcher.launch(dq_accumulate.prepare_kernel(bf16), passes, dq_accumulate.THREADS, device,
                            (layout.bits(out_v), layout.bits(dout_v), delta_v, dq_accum, cols))
    else:
        dq_kernel(dq, dqs, 1)
        dqa, dqas = 0, (0,) * 5
    grid = _grid(views.n_batch * pr.hkv, rows, pr.S, major)
    kind = "fused" if fused else "dkdv"
    dynamic = takes_dynamic(head_dim, elem, kind, cfg.tensor_core_dynamic_smem)
    smem = dynamic_bytes(head_dim, elem, kind, instance[3], instance[7], shared_scores) if dynamic else 0
    if dynamic and fused:  # two blocks an SM: 248 registers without spills (168: 428 bytes; ptxas 13.0, bf16)
        instance = instance[:4] + (255,) + instance[5:]
    else:
        instance = capped(cfg.tensor_core_dkdv_blocks)
    launcher.launch(_dkdv_kernel(*instance, fused, shared_scores, dynamic), grid, THREADS, device,
                    (q, qs[:5], k, ks[:5], v, vs[:5], dout, dos[:5], lse, ls, delta, dls, dk, dks[:5], dv, dvs[:5],
                     mask, ms, dqa, dqas[:5], *common, pr.hq, pr.hkv, pr.group, *tail), smem)
    if fused:
        launcher.launch(dq_accumulate.convert_kernel(bf16), passes, dq_accumulate.THREADS, device,
                        (dq_accum, layout.bits(dq_v), pr.scale, cols))
