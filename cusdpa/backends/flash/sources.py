"""FLASH kernel sources and their compiled functions: one module per (device, source, options), cached in
memory here and on disk by CuPy."""
from __future__ import annotations

import ctypes
import functools
import re

import kernels_cuda

from .config import MAX_SMEM, FlashConfig


def _wgmma_wrappers(widths) -> str:
    """wgmma m64nNk16 wrappers, overloaded on the accumulator array size (N / 2 floats per thread).

    wgmma_ss<TRANS_A, TRANS_B>: A and B from shared-memory descriptors (K-major, or MN-major where the
    flag is 1), accumulate iff ``acc``; wgmma_rs: A from four registers, B from a descriptor read
    transposed (MN-major), always accumulating. Generated because each width needs its own operand list.
    """
    out = []
    for n in widths:
        k = n // 2
        dregs = ", ".join(f"%{i}" for i in range(k))
        dcons = ", ".join(f'"+f"(d[{i}])' for i in range(k))
        mma = f'"wgmma.mma_async.sync.aligned.m64n{n}k16.f32." CUSDPA_MMA_TYPE "." CUSDPA_MMA_TYPE " "'
        out.append(
            f"template <int TRANS_A = 0, int TRANS_B = 0>\n"
            f"__device__ __forceinline__ void wgmma_ss(float (&d)[{k}], unsigned long long da, "
            f"unsigned long long db, int acc) {{\n"
            f'    asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{k + 2}, 0;\\n" {mma}\n'
            f'                 "{{{dregs}}}, %{k}, %{k + 1}, p, 1, 1, %{k + 3}, %{k + 4};\\n}}\\n"\n'
            f'                 : {dcons}\n                 : "l"(da), "l"(db), "r"(acc), "n"(TRANS_A), "n"(TRANS_B));\n}}\n')
        out.append(
            f"__device__ __forceinline__ void wgmma_rs(float (&d)[{k}], const u32 (&a)[4], "
            f"unsigned long long db) {{\n"
            f"    asm volatile({mma}\n"
            f'                 "{{{dregs}}}, {{%{k}, %{k + 1}, %{k + 2}, %{k + 3}}}, %{k + 4}, 1, 1, 1, 1;\\n"\n'
            f'                 : {dcons}\n'
            f'                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));\n}}\n')
    return "".join(out)


_WRAPPERS = re.compile(r"^// @WGMMA_WRAPPERS@(.*)$", re.MULTILINE)


def _define(options, name: str) -> int:
    return int(next(o.split("=", 1)[1] for o in options if o.startswith(f"-D{name}=")))


def kernel_source(name: str, options: tuple = ()) -> str:
    """A kernels_cuda source with its includes inlined and, where it asks for them with a line
    ``// @WGMMA_WRAPPERS@ NAME...``, the wgmma wrappers of the widths that those -D options (or numbers) give."""
    text = kernels_cuda.source(name)

    def wrappers(match: re.Match) -> str:  # each width a -D option's name or a number
        return _wgmma_wrappers(sorted({int(n) if n.isdigit() else _define(options, n) for n in match.group(1).split()}))

    return _WRAPPERS.sub(wrappers, text)


# ATTN_MASK of the Hopper forward: the attn_mask's kind, or a float mask's dtype
MASK_CODES = {None: 0, "bool": 1, "float16": 2, "bfloat16": 3, "float32": 4}


@functools.cache
def compile_options(dtype_name: str, E: int, Ev: int, dropout: bool, cfg: FlashConfig, dkdv_part: int = 3,
                    mask: str | None = None, alibi: bool = False, softcap: bool = False,
                    mask_grad: bool = False, queue: bool = False, tma_store: bool = False,
                    scheduled: bool = False) -> tuple:
    """NVRTC/nvcc options of one module; the CPU test compiles the same list with nvcc. ``mask``: the
    attn_mask's kind for the kernels that read one (a key of MASK_CODES); ``alibi``, ``softcap``: the Hopper
    kernels add ALiBi's bias, soft-cap the scores; ``mask_grad``: the Hopper backward stores a float mask's
    gradient; ``queue``: the Hopper forward's CTAs take tiles from a counter (a mask's, or a packed batch's);
    ``tma_store``: the Hopper forward stores O with TMA (FlashConfig.fwd90_tma_store, where the problem allows);
    ``scheduled``: the Hopper forward's tiles are dealt by the host's schedule (launches._scheduled)."""
    return (*(("-DATTN_MASK=%d" % MASK_CODES[mask],) if mask else ()), *(("-DALIBI=1",) if alibi else ()),
            *(("-DSOFTCAP=1",) if softcap else ()), *(("-DMASK_GRAD=1",) if mask_grad else ()),
            *(("-DFWD90_QUEUE=1",) if queue else ()), *(("-DFWD90_TMA_STORE=1",) if tma_store else ()),
            *(("-DCUSDPA_PHASES=1",) if cfg.fwd90_phases else ()),
            *(("-DFWD90_SKIP_IDLE=1",) if cfg.fwd90_skip_idle else ()),
            *(("-DFWD90_WG_BLOCKS=1",) if cfg.fwd90_wg_blocks else ()),
            *(("-DFWD90_SPLIT_LAST=1",) if cfg.fwd90_split_last else ()),
            *(("-DFWD90_SCHEDULE=1",) if scheduled else ()),
            *((f"-DFWD90_CLUSTER={cfg.fwd90_cluster}",) if cfg.fwd90_cluster > 1 else ()),
            "-std=c++17", "--use_fast_math", f"-DCUSDPA_BF16={int(dtype_name == 'bfloat16')}",
            f"-DHEAD_DIM={E}", f"-DHEAD_DIM_V={Ev}", f"-DIS_DROPOUT={int(dropout)}",
            f"-DFWD_WARPS={cfg.fwd_warps}", f"-DFWD_M_TILES={cfg.fwd_m_tiles}", f"-DFWD_BLOCK_N={cfg.fwd_block_n}",
            f"-DBWD_WARPS={cfg.bwd_warps}", f"-DBWD_BLOCK_M={cfg.bwd_block_m}", f"-DDKDV_PART={dkdv_part}",
            f"-DDQ_WARPS={cfg.dq_warps}", f"-DDQ_M_TILES={cfg.dq_m_tiles}",
            f"-DDQ_BLOCK_N={cfg.dq_block_n}", f"-DFWD90_WARPGROUPS={cfg.fwd90_warpgroups}",
            f"-DFWD90_BLOCK_N={cfg.fwd90_block_n}", f"-DFWD90_STAGES={cfg.fwd90_stages}",
            f"-DFWD90_PINGPONG={int(cfg.fwd90_pingpong)}", f"-DBWD90_BLOCK_M={cfg.bwd90_block_m}")


@functools.cache
def module(device: int, source: str, options: tuple):
    """The cupy.RawModule of ``source`` built with ``options`` on ``device`` (one per key, compiled once)."""
    import cupy

    with cupy.cuda.Device(device):
        return cupy.RawModule(code=kernel_source(source, options), options=options)


@functools.cache  # per-call lookups and driver attribute calls add up on small problems
def kernel(device: int, source: str, name: str, options: tuple, smem: int):
    """The compiled function ``name`` of ``source`` on ``device``, its dynamic shared memory raised to ``smem``."""
    if smem > MAX_SMEM:
        raise ValueError(f"{name} with {options} needs {smem} bytes of shared memory > {MAX_SMEM}; "
                         "choose smaller tiles in FlashConfig")
    import cupy

    with cupy.cuda.Device(device):  # the attribute and the driver function are per device
        fn = module(device, source, options).get_function(name)
        if smem > 48 * 1024 and fn.max_dynamic_shared_size_bytes < smem:
            fn.max_dynamic_shared_size_bytes = smem
        return fn.kernel  # cupy.cuda.function.Function, whose .ptr backends.launch hands to the driver


@functools.cache
def compute_capability(device: int) -> int:
    import cupy

    return int(cupy.cuda.Device(device).compute_capability)


@functools.cache
def shared_per_block(device: int) -> int:
    """The most shared memory a CTA on ``device`` may opt in to (sm_90 227 KB, sm_80 163, sm_86 and sm_89 99)."""
    import cupy

    return int(cupy.cuda.runtime.deviceGetAttribute(97, device))  # cudaDevAttrMaxSharedMemoryPerBlockOptin


@functools.cache
def multiprocessors(device: int) -> int:
    import cupy

    return int(cupy.cuda.Device(device).attributes["MultiProcessorCount"])


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig (cuda.h), without launch attributes
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("smem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.c_void_p), ("num_attrs", ctypes.c_uint)]


@functools.cache
def max_active_clusters(device: int, fn, cluster: int, threads: int, smem: int) -> int:
    """How many clusters of ``cluster`` CTAs of ``fn`` (compiled with that cluster size, ``threads`` threads and
    ``smem`` bytes of dynamic shared memory each) the device runs at once (cuOccupancyMaxActiveClusters): a
    persistent grid of more would run its last clusters after the others. Where the driver cannot say, one
    cluster per ``cluster`` SMs."""
    import cupy

    fallback = multiprocessors(device) // cluster
    try:
        query = ctypes.CDLL("libcuda.so.1").cuOccupancyMaxActiveClusters
    except (OSError, AttributeError):
        return fallback
    query.restype = ctypes.c_int
    query.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_void_p, ctypes.POINTER(_LaunchConfig)]
    config = _LaunchConfig((ctypes.c_uint * 3)(cluster * multiprocessors(device), 1, 1),
                           (ctypes.c_uint * 3)(threads, 1, 1), smem, None, None, 0)
    found = ctypes.c_int(0)
    with cupy.cuda.Device(device):
        err = query(ctypes.byref(found), ctypes.c_void_p(fn.ptr), ctypes.byref(config))
    return found.value if err == 0 and found.value > 0 else fallback
