"""The tensor_core variant of the forward: a thin Numba kernel around a linked CUDA C tile loop.

The Numba kernel resolves what differs per block (batch and head from the grid, GQA's kv head,
varlen sequence bounds, strided and broadcast operands) into row pointers and row strides, and
calls ``efficient::forward`` in kernels_cuda/efficient_fwd.cuh, which runs FlashAttention-2's tile loop on
mma.sync. The C source is linked through ``cuda.declare_device(..., link=[CUSource], abi="c")``,
one instantiation (head dim, dtype) per source so NVRTC compiles only what a problem needs, once
per process. fp16/bf16, E and Ev <= 128 (padded to 32/64/96/128), unit stride along the head dim;
every mask kind, causal, window, dropout, GQA and varlen as in the portable variant.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import cuda

import kernels_cuda

from .device import SIMULATOR
from . import launcher, layout
from .layout import cdiv

HEAD_DIMS = (32, 64, 96, 128)
BLOCK_M = 64  # 4 warps x 16 rows (efficient_fwd.cuh's EFF_BLOCK_M)
BLOCK_N = 64  # keys per shared-memory tile: 2 tiles of 64 x (128 + 8) halves = 34 KiB at head dim 128
THREADS = 128
MASK_KINDS = {"bool": 1, "float16": 2, "bfloat16": 3, "float32": 4, "float64": 5}
# The C entry's parameters (efficient_fwd.cuh, EFF_NAME): pointers travel as int64 addresses.
_ARGS = ("int64, int64, int64, int64, int64, int64, int64, int64, int64, int64, int64, int64, int64, int64, "
         "int64, int64, int64, int64, int64, int64, int64, int64, float32, int64, int64, int64, int64, int64, "
         "int64, float32")


def reasons(pr) -> list[str]:
    """Why the tensor_core variant cannot run ``pr`` (empty: it can)."""
    out = []
    if SIMULATOR:
        return ["the CUDA simulator cannot run linked CUDA C (the tensor_core variant)"]
    if pr.xp is np:
        out.append("the tensor_core variant takes GPU arrays")
    if pr.dtype.name not in ("float16", "bfloat16"):
        out.append(f"the tensor_core variant takes float16/bfloat16, not {pr.dtype.name}")
    if max(pr.E, pr.Ev) > HEAD_DIMS[-1]:
        out.append(f"the tensor_core variant takes head dims up to {HEAD_DIMS[-1]}, got E={pr.E}, Ev={pr.Ev}")
    for name, x in (("query", pr.q), ("key", pr.k), ("value", pr.v)):
        if x.shape[-1] > 1 and x.strides[-1] != x.itemsize:
            out.append(f"the tensor_core variant needs unit stride along the head dim of {name}")
    if pr.mask_kind == "float" and pr.mask.dtype.name not in MASK_KINDS:
        out.append(f"the tensor_core variant reads float masks of {'/'.join(MASK_KINDS)}, not {pr.mask.dtype}")
    return out


def head_dim_for(E: int, Ev: int) -> int:
    return next(d for d in HEAD_DIMS if d >= max(E, Ev))


@functools.cache
def _tile_loop(head_dim: int, bf16: bool):
    name = f"efficient_forward_{'bf16' if bf16 else 'f16'}_d{head_dim}"
    source = (f"#define EFF_NAME {name}\n#define EFF_HEAD_DIM {head_dim}\n#define EFF_BLOCK_N {BLOCK_N}\n"
              f"#define EFF_BF16 {'true' if bf16 else 'false'}\n" + kernels_cuda.source("efficient_fwd.cuh"))
    return cuda.declare_device(name, f"int32({_ARGS})", link=[cuda.CUSource(source, name=f"{name}.cu")], abi="c")


@functools.cache
def _kernel(head_dim: int, bf16: bool):
    tile_loop = _tile_loop(head_dim, bf16)

    @cuda.jit
    def attention_forward_tc(q, qs, k, ks, v, vs, out, os_, lse, ls, mask, ms, mask_kind, cu_q, cu_k, varlen,
                             nb1, nb2, hq, group, L, S, E, Ev, scale, lower_right, left, right, dropout,
                             seed_lo, seed_hi, offset, threshold, rescale):
        """One block per (batch-head, 64 query rows); q/k/v/out/lse/mask are base addresses and
        qs/ks/... their element strides over (B0, B1, B2, H, row[, col]); causal comes folded into
        (left, right) as the window around the diagonal (Problem.window_bounds)."""
        bh = cuda.blockIdx.x
        h = bh % hq
        hk = h // group
        flat = bh // hq
        # the last query blocks first: under a causal band they see the most keys, and blocks start in grid
        # order, so the heavy ones start first rather than forming the tail (FlashAttention-2's order)
        m_first = (cuda.gridDim.y - 1 - cuda.blockIdx.y) * BLOCK_M
        if varlen:
            b0 = b1 = b2 = 0
            q0 = cu_q[flat]
            k0 = cu_k[flat]
            L_b = cu_q[flat + 1] - q0
            S_b = cu_k[flat + 1] - k0
        else:
            b0, b1, b2 = flat // (nb1 * nb2), (flat // nb2) % nb1, flat % nb2
            q0 = k0 = 0
            L_b = L
            S_b = S
        if m_first >= L_b:
            return
        q_at = q + 2 * (b0 * qs[0] + b1 * qs[1] + b2 * qs[2] + h * qs[3] + q0 * qs[4])
        k_at = k + 2 * (b0 * ks[0] + b1 * ks[1] + b2 * ks[2] + hk * ks[3] + k0 * ks[4])
        v_at = v + 2 * (b0 * vs[0] + b1 * vs[1] + b2 * vs[2] + hk * vs[3] + k0 * vs[4])
        out_at = out + 2 * (b0 * os_[0] + b1 * os_[1] + b2 * os_[2] + h * os_[3] + q0 * os_[4])
        lse_at = lse + 4 * (b0 * ls[0] + b1 * ls[1] + b2 * ls[2] + h * ls[3] + q0 * ls[4])
        mask_at = mask + ms[6] * (b0 * ms[0] + b1 * ms[1] + b2 * ms[2] + h * ms[3])
        shift = S_b - L_b if lower_right else 0
        tile_loop(q_at, qs[4], k_at, ks[4], v_at, vs[4], out_at, os_[4], lse_at, ls[4], mask_at, ms[4], ms[5],
                  mask_kind, m_first, L_b, S_b, E, Ev, shift, left, right, np.float32(scale), dropout, bh,
                  seed_lo, seed_hi, offset, threshold, np.float32(rescale))

    return attention_forward_tc


def _address_and_strides(x):
    """(data address, element strides) of a CuPy array (a view's address is its element 0)."""
    return int(x.data.ptr), tuple(int(s) // x.itemsize for s in x.strides)


def forward(pr, views, out_v, lse_v, device, structure):
    """Launch the tensor_core forward into out_v (6-D) and lse_v (5-D) views; see attention.forward."""
    _, _, left, right, seed_lo, seed_hi, offset, threshold, rescale = structure
    head_dim = head_dim_for(pr.E, pr.Ev)
    kernel = _kernel(head_dim, layout.dtype_name(pr.dtype) == "bfloat16")
    q, qs = _address_and_strides(views.q)
    k, ks = _address_and_strides(views.k)
    v, vs = _address_and_strides(views.v)
    out, os_ = _address_and_strides(out_v)
    lse, ls = _address_and_strides(lse_v)
    mask, ms = _address_and_strides(views.mask)
    mask_kind = 0
    if pr.mask_kind is not None:
        mask_kind = MASK_KINDS["bool" if pr.mask_kind == "bool" else layout.dtype_name(pr.mask.dtype)]
    ms = ms + (views.mask.itemsize,)
    varlen = pr.varlen is not None
    grid = (views.n_batch * pr.hq, cdiv(pr.L, BLOCK_M))
    launcher.launch(kernel, grid, THREADS, device,
                    (q, qs[:5], k, ks[:5], v, vs[:5], out, os_[:5], lse, ls, mask, ms, mask_kind, views.cu_q, views.cu_k,
                     varlen, views.nb1, views.nb2, pr.hq, pr.group, pr.L, pr.S, pr.E, pr.Ev, pr.scale, pr.lower_right,
                     left, right, pr.dropout_p > 0, seed_lo, seed_hi, offset, threshold, rescale))
