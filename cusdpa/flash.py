"""FLASH: FlashAttention-2-style fused attention on tensor cores (CUDA C++ in cusdpa/cuda, via CuPy NVRTC).

One compiled module per (device, dtype, E, Ev, dropout, tile configuration), cached in memory here and
on disk by CuPy. Kernels run on CuPy's current stream. Inputs need only a unit last-dim stride,
16-byte-aligned rows and a batch layout that collapses to one stride; anything else (and broadcast
batch dims that do not collapse) is copied to a contiguous array first.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import checks, environment, philox
from .dispatch import Backend, Capabilities, Implementation
from .launch import Launch, Slot

CUDA_DIR = Path(__file__).parent / "cuda"
MAX_GRID_Y = 65535

CAPABILITIES = Capabilities(arrays=frozenset({"cupy"}), dtypes=frozenset({"float16", "bfloat16"}),
                            max_head_dim=256, head_dim_multiple=8, mask_kinds=frozenset())


@dataclass(frozen=True)
class FlashConfig:
    """Tile shapes of the three kernels (see the .cu files). ``for_head_dims`` picks the defaults."""

    fwd_warps: int = 4
    fwd_m_tiles: int = 2  # m16 tiles per warp: 2 halves the shared-memory reads per mma
    fwd_block_n: int = 64
    bwd_warps: int = 8  # dK/dV kernel: 16 keys per warp
    bwd_block_m: int = 64  # dK/dV kernel: queries per step
    split_dkdv: bool = False  # dV then dK in two passes (registers for E > 128)
    dq_warps: int = 8
    dq_m_tiles: int = 1
    dq_block_n: int = 64
    use_wgmma: bool = True  # Hopper forward (flash_fwd_sm90.cu) where the device and head dims allow
    fwd90_warpgroups: int = 2  # 64 query rows each
    fwd90_block_n: int = 128
    fwd90_min_blocks: int = 1  # __launch_bounds__ minimum: > 1 caps registers so more CTAs share an SM

    @staticmethod
    @functools.cache
    def for_head_dims(E: int, Ev: int) -> "FlashConfig":
        d = max(_pad16(E), _pad16(Ev))
        # Tile choices measured with benchmarks/flash_sweep.py (BENCHMARKS.md): backward on the H100,
        # Hopper forward on the H200.
        if d <= 64:
            return FlashConfig(bwd_block_m=128, dq_warps=4, fwd90_warpgroups=3)
        if d <= 128:  # 32 rows x 128 accumulators per warp leave room for a 32-key score block only
            return FlashConfig(fwd_block_n=32, dq_warps=4, dq_m_tiles=2, dq_block_n=32, fwd90_warpgroups=3,
                               fwd90_block_n=64)
        return FlashConfig(fwd_m_tiles=1, fwd_block_n=32, bwd_block_m=32, split_dkdv=True, dq_block_n=32)

    @staticmethod
    @functools.cache
    def for_problem(E: int, Ev: int, L: int, causal: bool) -> "FlashConfig":
        """``for_head_dims``, with other Hopper forward tiles for short or causal problems. A tall query block
        spends more of its time on the masked diagonal and leaves fewer blocks to balance the triangle; with
        E <= 64, capping registers (``fwd90_min_blocks``, one 8-byte spill) doubles the blocks resident per
        SM, so one block's loads overlap another's math where each has only a few key blocks to pipeline.
        Kernel times swept at L = 256 to 16384 on the H200 (BENCHMARKS.md)."""
        cfg = FlashConfig.for_head_dims(E, Ev)
        d = max(E, Ev)
        if d <= 64:
            if causal and L <= 1024:  # 64-row blocks, four per SM
                return dataclasses.replace(cfg, fwd90_warpgroups=1, fwd90_block_n=64, fwd90_min_blocks=4)
            if causal or L <= 2048:  # 128-row blocks, two per SM
                return dataclasses.replace(cfg, fwd90_warpgroups=2, fwd90_block_n=64, fwd90_min_blocks=2)
        elif causal and L <= 2048 and d <= 128:
            return dataclasses.replace(cfg, fwd90_warpgroups=2, fwd90_block_n=128)
        return cfg

    @property
    def fwd_block_m(self) -> int:
        return self.fwd_warps * 16 * self.fwd_m_tiles

    @property
    def dq_block_m(self) -> int:
        return self.dq_warps * 16 * self.dq_m_tiles

    @property
    def bwd_block_n(self) -> int:
        return self.bwd_warps * 16


def _pad16(d: int) -> int:
    return (d + 15) // 16 * 16


def _pitches(E: int, Ev: int) -> tuple[int, int]:
    # Shared-memory row pitch (elements): padded head dim + 8, an odd number of 16-byte chunks.
    return _pad16(E) + 8, _pad16(Ev) + 8


def smem_bytes(kind: str, cfg: FlashConfig, E: int, Ev: int) -> int:
    """Dynamic shared memory of each kernel, as laid out in the .cu files."""
    qp, vp = _pitches(E, Ev)
    if kind == "fwd":
        bm, bn = cfg.fwd_block_m, cfg.fwd_block_n
        return 2 * (bm * max(qp, vp) + 2 * bn * qp + 2 * bn * vp)
    if kind == "fwd_sm90":  # unpadded, swizzled tiles
        bm, bn = 64 * cfg.fwd90_warpgroups, cfg.fwd90_block_n
        return 2 * (bm * E + 2 * bn * E + 2 * bn * Ev)
    if kind == "dkdv":
        bn, bm = cfg.bwd_block_n, cfg.bwd_block_m
        return 2 * (bn * qp + bn * vp + 2 * bm * qp + 2 * bm * vp) + 4 * 4 * bm
    if kind == "dq":
        bm, bn = cfg.dq_block_m, cfg.dq_block_n
        return 2 * (bm * qp + bm * vp + 2 * bn * qp + 2 * bn * vp)
    raise ValueError(f"kind={kind!r}")


def _wgmma_wrappers(widths=(64, 128)) -> str:
    """wgmma m64nNk16 wrappers, overloaded on the accumulator array size (N / 2 floats per thread).

    wgmma_ss: A and B from shared-memory descriptors, accumulate iff ``acc``; wgmma_rs: A from four
    registers, B from a descriptor read transposed (MN-major), always accumulating. Generated because
    each width needs its own operand list.
    """
    out = []
    for n in widths:
        k = n // 2
        dregs = ", ".join(f"%{i}" for i in range(k))
        dcons = ", ".join(f'"+f"(d[{i}])' for i in range(k))
        mma = f'"wgmma.mma_async.sync.aligned.m64n{n}k16.f32." CUSDPA_MMA_TYPE "." CUSDPA_MMA_TYPE " "'
        out.append(
            f"__device__ __forceinline__ void wgmma_ss(float (&d)[{k}], unsigned long long da, "
            f"unsigned long long db, int acc) {{\n"
            f'    asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{k + 2}, 0;\\n" {mma}\n'
            f'                 "{{{dregs}}}, %{k}, %{k + 1}, p, 1, 1, 0, 0;\\n}}\\n"\n'
            f'                 : {dcons}\n                 : "l"(da), "l"(db), "r"(acc));\n}}\n')
        out.append(
            f"__device__ __forceinline__ void wgmma_rs(float (&d)[{k}], const u32 (&a)[4], "
            f"unsigned long long db) {{\n"
            f"    asm volatile({mma}\n"
            f'                 "{{{dregs}}}, {{%{k}, %{k + 1}, %{k + 2}, %{k + 3}}}, %{k + 4}, 1, 1, 1, 1;\\n"\n'
            f'                 : {dcons}\n'
            f'                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));\n}}\n')
    return "".join(out)


def kernel_source(name: str) -> str:
    """A .cu file with flash_common.cuh inlined (and the generated wgmma wrappers where it asks for
    them), so CuPy's disk cache keys on the whole text."""
    common = (CUDA_DIR / "flash_common.cuh").read_text()
    text = (CUDA_DIR / name).read_text().replace('#include "flash_common.cuh"', common)
    return text.replace("// @WGMMA_WRAPPERS@", _wgmma_wrappers())


@functools.cache
def compile_options(dtype_name: str, E: int, Ev: int, dropout: bool, cfg: FlashConfig, dkdv_part: int = 3) -> tuple:
    """NVRTC/nvcc options of one module; the CPU test compiles the same list with nvcc."""
    return ("-std=c++17", "--use_fast_math", f"-DCUSDPA_BF16={int(dtype_name == 'bfloat16')}",
            f"-DHEAD_DIM={E}", f"-DHEAD_DIM_V={Ev}", f"-DIS_DROPOUT={int(dropout)}",
            f"-DFWD_WARPS={cfg.fwd_warps}", f"-DFWD_M_TILES={cfg.fwd_m_tiles}", f"-DFWD_BLOCK_N={cfg.fwd_block_n}",
            f"-DBWD_WARPS={cfg.bwd_warps}", f"-DBWD_BLOCK_M={cfg.bwd_block_m}", f"-DDKDV_PART={dkdv_part}",
            f"-DDQ_WARPS={cfg.dq_warps}", f"-DDQ_M_TILES={cfg.dq_m_tiles}",
            f"-DDQ_BLOCK_N={cfg.dq_block_n}", f"-DFWD90_WARPGROUPS={cfg.fwd90_warpgroups}",
            f"-DFWD90_BLOCK_N={cfg.fwd90_block_n}",
            f"-DFWD90_MIN_BLOCKS={cfg.fwd90_min_blocks}")


def sm90_forward_applies(E: int, Ev: int, compute_capability: int, cfg: FlashConfig) -> bool:
    """The wgmma forward takes E, Ev in {64, 128} on compute capability 9.0 (sm_90a instructions)."""
    return cfg.use_wgmma and compute_capability == 90 and E in (64, 128) and Ev in (64, 128)


@functools.cache
def _module(device: int, source: str, options: tuple):
    import cupy

    with cupy.cuda.Device(device):
        return cupy.RawModule(code=kernel_source(source), options=options)


MAX_SMEM = 227 * 1024  # opt-in shared memory per block on sm_80 / sm_90


@functools.cache  # per-call lookups and driver attribute calls add up on small problems
def _kernel(device: int, source: str, name: str, options: tuple, smem: int):
    if smem > MAX_SMEM:
        raise ValueError(f"{name} with {options} needs {smem} bytes of shared memory > {MAX_SMEM}; "
                         "choose smaller tiles in FlashConfig")
    import cupy

    with cupy.cuda.Device(device):  # the attribute and the driver function are per device
        fn = _module(device, source, options).get_function(name)
        if smem > 48 * 1024 and fn.max_dynamic_shared_size_bytes < smem:
            fn.max_dynamic_shared_size_bytes = smem
        return fn.kernel  # cupy.cuda.function.Function, whose .ptr cusdpa.launch hands to the driver


# ---- operands ------------------------------------------------------------------------------------------

def _usable(x) -> bool:
    """Unit last-dim stride, 16-byte aligned base and row strides: what cp.async and 16-byte stores need."""
    item = x.itemsize
    if x.ndim and x.shape[-1] > 1 and x.strides[-1] != item:
        return False
    return x.data.ptr % 16 == 0 and all(s % 16 == 0 for s, n in zip(x.strides[:-1], x.shape[:-1]) if n > 1)


def _collapse(strides, shape) -> int | None:
    """One stride for the flattened batch dims (row-major order), or None if they do not collapse."""
    dims = [(st, n) for st, n in zip(strides, shape) if n > 1]
    for (s_outer, _), (s_inner, n_inner) in zip(dims, dims[1:]):
        if s_outer != s_inner * n_inner:
            return None
    return dims[-1][0] if dims else 0


def _fresh(x):
    """A new C-contiguous copy: its own allocation is aligned, where ``ascontiguousarray`` would hand back
    a contiguous array whose base is not 16-byte aligned unchanged (cp.async then faults)."""
    import cupy

    return cupy.array(x, order="C", copy=True)


def _readable(x):
    """``x`` when the kernels can read it in place, else a fresh copy."""
    return x if _usable(x) else _fresh(x)


def _dense_operand(x, batch_shape):
    """(array viewable as (*batch, H, R, D), flattened-batch stride in elements) for a dense operand."""
    import cupy

    x = x if x.ndim >= 3 else x[None]
    full = cupy.broadcast_to(x, batch_shape + x.shape[-3:])
    stride_b = _collapse(full.strides[:len(batch_shape)], batch_shape) if _usable(x) else None
    if stride_b is None:
        full = _fresh(full)
        stride_b = _collapse(full.strides[:len(batch_shape)], batch_shape)
    return full, stride_b // full.itemsize


def _strides(x, dims) -> list[np.int64]:
    return [np.int64(x.strides[d] // x.itemsize) for d in dims]


def _mask_params(pr):
    left, right = pr.window if pr.window is not None else (-1, -1)
    if pr.causal:
        right = 0 if right < 0 else min(right, 0)
    return np.int32(left), np.int32(right), np.int32(pr.lower_right)


def _dropout_params(pr):
    p = pr.dropout_p
    return (Slot("seed_lo"), Slot("seed_hi"), np.uint32(pr.offset),
            np.uint32(philox.keep_threshold(p) if p > 0 else 0xFFFFFFFF),
            np.float32(1.0 / (1.0 - p) if p < 1 else 0.0))


def seed_values(seed: int) -> dict:
    """The dropout seed's slot values (the key words of Philox, as ints: a launch cell holds either)."""
    return {"seed_lo": seed & 0xFFFFFFFF, "seed_hi": seed >> 32}


@dataclass
class _Layout:
    """Kernel views of one problem: operands, batch count and the (b, h, row) strides of each."""

    q: object
    k: object
    v: object
    B: int
    cu_q: object
    cu_k: object
    strides: dict  # name -> (stride_b, stride_h, stride_row) in elements


def _layout(pr) -> _Layout:
    if pr.varlen is not None:
        q, k, v = (_readable(x) for x in (pr.q, pr.k, pr.v))
        strides = {n: [np.int64(0)] + _strides(x, (1, 0)) for n, x in (("q", q), ("k", k), ("v", v))}
        return _Layout(q, k, v, pr.varlen.batch, pr.varlen.cu_seqlens_q, pr.varlen.cu_seqlens_k, strides)
    (q, sq), (k, sk), (v, sv) = (_dense_operand(x, pr.batch_shape) for x in (pr.q, pr.k, pr.v))
    nb = len(pr.batch_shape)
    strides = {n: [np.int64(sb)] + _strides(x, (nb, nb + 1)) for n, x, sb in (("q", q, sq), ("k", k, sk), ("v", v, sv))}
    null = np.uint64(0)
    return _Layout(q, k, v, math.prod(pr.batch_shape), null, null, strides)


def _out_view(pr, lay, x, heads, rows, dim):
    """(B, H, rows, dim) contiguous view of a dense result (or the packed array itself) and its strides."""
    if pr.varlen is not None:
        return x, [np.int64(0)] + _strides(x, (1, 0))
    v = x.reshape(lay.B, heads, rows, dim)
    return v, _strides(v, (0, 1, 2))


def _lse_strides(pr):
    if pr.varlen is not None:
        return [np.int64(0), np.int64(pr.q.shape[0])]
    return [np.int64(pr.hq * pr.L), np.int64(pr.L)]


def _common(pr, lay):
    return (lay.cu_q, lay.cu_k, np.int32(pr.L), np.int32(pr.S), np.int32(pr.hq), np.int32(pr.group))


# ---- forward / backward --------------------------------------------------------------------------------

def _config(pr) -> FlashConfig:
    return FlashConfig.for_problem(pr.E, pr.Ev, pr.L, pr.causal)


def _device(pr) -> int:
    return pr.q.device.id


def _forward(pr, out=None, lse=None):
    import cupy

    xp = cupy
    with cupy.cuda.Device(_device(pr)):
        res_out = out if out is not None and out.flags.c_contiguous and _usable(out) else \
            xp.empty(pr.out_shape, dtype=pr.dtype)
        res_lse = lse if lse is not None and lse.flags.c_contiguous else xp.empty(pr.lse_shape, dtype=np.float32)
        if res_out.size or res_lse.size:
            _launch_forward(pr, res_out, res_lse)
        for dst, src in ((out, res_out), (lse, res_lse)):
            if dst is not None and dst is not src:
                xp.copyto(dst, src)
        return (out if out is not None else res_out), (lse if lse is not None else res_lse)


def _forward_launch(pr, lay, o_strides) -> Launch | None:
    """The forward kernel of ``pr`` with slots q, k, v, o, lse and the seed; None when there is nothing to do."""
    if lay.B * pr.hq == 0 or pr.L == 0:
        return None
    cfg = _config(pr)
    opts = compile_options(pr.dtype_name, pr.E, pr.Ev, pr.dropout_p > 0, cfg)
    if sm90_forward_applies(pr.E, pr.Ev, _compute_capability(_device(pr)), cfg):
        smem = smem_bytes("fwd_sm90", cfg, pr.E, pr.Ev)
        block_m, threads = 64 * cfg.fwd90_warpgroups, 128 * cfg.fwd90_warpgroups
        fn = _kernel(_device(pr), "flash_fwd_sm90.cu", "flash_fwd_sm90", opts + ("-arch=sm_90a",), smem)
    else:
        smem, block_m, threads = smem_bytes("fwd", cfg, pr.E, pr.Ev), cfg.fwd_block_m, cfg.fwd_warps * 32
        fn = _kernel(_device(pr), "flash_fwd.cu", "flash_fwd", opts, smem)
    grid = ((pr.L + block_m - 1) // block_m, lay.B * pr.hq)
    args = (Slot("q"), Slot("k"), Slot("v"), Slot("o"), Slot("lse"), *_common(pr, lay), *lay.strides["q"],
            *lay.strides["k"], *lay.strides["v"], *o_strides, *_lse_strides(pr),
            np.float32(pr.scale * math.log2(math.e)), *_mask_params(pr), *_dropout_params(pr))
    return Launch(fn, grid, (threads,), smem, args)


def _launch_forward(pr, out, lse):
    import cupy

    lay = _layout(pr)
    o_view, o_strides = _out_view(pr, lay, out, pr.hq, pr.L, pr.Ev)
    launch = _forward_launch(pr, lay, o_strides)
    if launch is not None:
        launch(dict(q=lay.q, k=lay.k, v=lay.v, o=o_view, lse=lse, **seed_values(pr.seed)),
               cupy.cuda.get_current_stream().ptr)


def _backward(pr, out, lse, dout, deterministic=False, grads=None):
    """dq, dk, dv. Every kernel sums in a fixed order without atomics, so the gradients are bit-identical
    run to run whatever ``deterministic`` says. (An fp32-atomic dQ inside the dK/dV kernel, as
    FlashAttention-2 does it, measured slower on the H100 than the separate dQ pass: see BENCHMARKS.md.)"""
    import cupy

    from .reference import _sum_to_shape

    with cupy.cuda.Device(_device(pr)):
        if pr.varlen is not None:
            full = (pr.q.shape, pr.k.shape, pr.v.shape)
        else:
            bs = pr.batch_shape
            full = (bs + (pr.hq, pr.L, pr.E), bs + (pr.hkv, pr.S, pr.E), bs + (pr.hkv, pr.S, pr.Ev))
        inputs = (pr.q, pr.k, pr.v)
        # Write straight into the caller's arrays when they have the kernels' layout (no broadcast to undo).
        direct = [grads is not None and math.prod(x.shape) == math.prod(f) and grads[n].flags.c_contiguous
                  and _usable(grads[n]) for n, (x, f) in enumerate(zip(inputs, full))]
        work = [grads[n].reshape(f) if direct[n] else cupy.empty(f, dtype=pr.dtype) for n, f in enumerate(full)]
        if any(w.size for w in work):
            _launch_backward(pr, out, lse, dout, *work)
        result = []
        for n, (x, w) in enumerate(zip(inputs, work)):
            if direct[n]:
                result.append(grads[n])
                continue
            if pr.varlen is None:  # sum over batch dims that the inputs broadcast
                w = _sum_to_shape(w, x.shape if x.ndim >= 3 else (1,) + x.shape).reshape(x.shape)
            if grads is not None:
                cupy.copyto(grads[n], w)
                w = grads[n]
            result.append(w)
        return tuple(result)


def _backward_launches(pr, lay, strides) -> list[Launch]:
    """The backward kernels of ``pr`` in launch order, with slots q, k, v, o, do, lse, delta, dq, dk, dv
    and the seed; ``strides`` holds the (b, h, row) strides of o, do, dq, dk and dv."""
    if lay.B * pr.hq == 0:
        return []
    cfg, dev = _config(pr), _device(pr)
    mask = _mask_params(pr)
    drop = _dropout_params(pr)
    scale, scale_log2 = np.float32(pr.scale), np.float32(pr.scale * math.log2(math.e))
    parts = (1, 2) if cfg.split_dkdv else (3,)
    qkv = (Slot("q"), Slot("k"), Slot("v"))
    ranks = (*_common(pr, lay), *lay.strides["q"], *lay.strides["k"], *lay.strides["v"], *strides["do"])

    def opts(part=3):
        return compile_options(pr.dtype_name, pr.E, pr.Ev, pr.dropout_p > 0, cfg, part)

    launches = []
    if pr.L:
        rows = 64
        pre = _kernel(dev, "flash_bwd.cu", "flash_bwd_preprocess", opts(parts[0]), 0)
        launches.append(Launch(pre, ((pr.L + rows - 1) // rows, lay.B * pr.hq), (256,), 0,
                               (Slot("o"), Slot("do"), Slot("delta"), *_common(pr, lay)[:5], *strides["o"],
                                *strides["do"], *_lse_strides(pr), *mask, np.int32(rows))))
    if pr.S:
        grid = ((pr.S + cfg.bwd_block_n - 1) // cfg.bwd_block_n, lay.B * pr.hkv)
        smem = smem_bytes("dkdv", cfg, pr.E, pr.Ev)
        for part in parts:
            fn = _kernel(dev, "flash_bwd.cu", "flash_bwd_dkdv", opts(part), smem)
            launches.append(Launch(fn, grid, (cfg.bwd_warps * 32,), smem,
                                   (*qkv, Slot("do"), Slot("lse"), Slot("delta"), Slot("dk"), Slot("dv"), *ranks,
                                    *strides["dk"], *strides["dv"], *_lse_strides(pr), scale, scale_log2, *mask,
                                    *drop)))
    if pr.L:
        smem = smem_bytes("dq", cfg, pr.E, pr.Ev)
        fn = _kernel(dev, "flash_bwd.cu", "flash_bwd_dq", opts(parts[0]), smem)
        grid = ((pr.L + cfg.dq_block_m - 1) // cfg.dq_block_m, lay.B * pr.hq)
        launches.append(Launch(fn, grid, (cfg.dq_warps * 32,), smem,
                               (*qkv, Slot("do"), Slot("lse"), Slot("delta"), Slot("dq"), *ranks, *strides["dq"],
                                *_lse_strides(pr), scale, scale_log2, *mask, *drop)))
    return launches


def _launch_backward(pr, out, lse, dout, dq, dk, dv):
    import cupy

    lay = _layout(pr)
    out_c, dout_c = _readable(out), _readable(dout)
    views, strides = {}, {}
    for name, x, heads, rows, dim in (("o", out_c, pr.hq, pr.L, pr.Ev), ("do", dout_c, pr.hq, pr.L, pr.Ev),
                                      ("dq", dq, pr.hq, pr.L, pr.E), ("dk", dk, pr.hkv, pr.S, pr.E),
                                      ("dv", dv, pr.hkv, pr.S, pr.Ev)):
        views[name], strides[name] = _out_view(pr, lay, x, heads, rows, dim)
    lse_c = cupy.ascontiguousarray(lse)
    values = dict(q=lay.q, k=lay.k, v=lay.v, lse=lse_c, delta=cupy.empty_like(lse_c), **views,
                  **seed_values(pr.seed))
    stream = cupy.cuda.get_current_stream().ptr
    for launch in _backward_launches(pr, lay, strides):
        launch(values, stream)


# ---- cached plans ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """Every launch of one problem signature, for callers that repeat it (the torch bridge's eager path).

    Operands are read in place and results written to fresh buffers: q, k, v as they are, out
    (``out_shape``) and dout in ``out_strides`` (``checks.token_major_strides``: PyTorch's layout for
    fused SDPA outputs), lse (``lse_shape``, float32), delta like lse, and dq, dk, dv contiguous in the
    shapes of q, k and v. The slot values are device pointers (ints) and ``seed_values``; launches go
    on the given stream, with the operands' device current.
    """

    out_shape: tuple
    out_strides: tuple  # in elements
    lse_shape: tuple
    forward: Launch | None
    backward: tuple


def plan(pr, backward: bool = True) -> Plan | None:
    """A Plan for dense problems whose q, k and v the kernels read in place with every batch dim present
    (no broadcast to sum gradients over); None for anything else, which takes the general path. Without
    ``backward`` the backward kernels are neither compiled nor planned (inference)."""
    if pr.varlen is not None or pr.mask is not None:
        return None
    q, k, v = pr.q, pr.k, pr.v
    if not (q.ndim == k.ndim == v.ndim >= 3 and q.shape[:-3] == k.shape[:-3] == v.shape[:-3] == pr.batch_shape):
        return None
    if not all(_usable(x) for x in (q, k, v)):
        return None
    lay = _layout(pr)
    if any(a.data.ptr != x.data.ptr for a, x in ((lay.q, q), (lay.k, k), (lay.v, v))):  # copied: no in-place read
        return None

    def contiguous(heads, rows, dim):
        return [np.int64(heads * rows * dim), np.int64(rows * dim), np.int64(dim)]

    token_major = [np.int64(pr.L * pr.hq * pr.Ev), np.int64(pr.Ev), np.int64(pr.hq * pr.Ev)]  # (b, h, row)
    strides = {"o": token_major, "do": token_major, "dq": contiguous(pr.hq, pr.L, pr.E),
               "dk": contiguous(pr.hkv, pr.S, pr.E), "dv": contiguous(pr.hkv, pr.S, pr.Ev)}
    backward_launches = tuple(_backward_launches(pr, lay, strides)) if backward else ()
    return Plan(pr.out_shape, checks.token_major_strides(pr.out_shape), pr.lse_shape,
                _forward_launch(pr, lay, strides["o"]), backward_launches)


# ---- dispatch ---------------------------------------------------------------------------------------------

@functools.cache
def _compute_capability(device: int) -> int:
    import cupy

    return int(cupy.cuda.Device(device).compute_capability)


def _environment_reasons(pr):
    problem = environment.cupy_problem()
    if problem:
        return [problem]
    reasons = []
    if pr is not None and min(pr.E, pr.Ev) < 8:
        reasons.append(f"head dims E={pr.E}, Ev={pr.Ev} must be >= 8")
    if pr is not None and pr.xp.__name__ == "cupy":
        cc = _compute_capability(_device(pr))
        if cc < 80:
            reasons.append(f"needs compute capability >= 8.0 (bf16/fp16 mma.sync), cuda:{_device(pr)} has {cc / 10}")
        batch = pr.varlen.batch if pr.varlen is not None else math.prod(pr.batch_shape)
        if batch * max(pr.hq, 1) > MAX_GRID_Y:
            reasons.append(f"batch x heads = {batch * pr.hq} > {MAX_GRID_Y} (grid limit)")
    return reasons


IMPL = Implementation(backend=Backend.FLASH, capabilities=CAPABILITIES, environment_reasons=_environment_reasons,
                      forward=_forward, backward=_backward)
