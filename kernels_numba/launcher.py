"""Numba kernels launched as prepared launches: Numba's dispatcher once per argument signature, then
``cuLaunchKernel`` on the compiled function with the arguments flattened as Numba flattens them.

Numba's own call path types every argument, wraps every CuPy array into a DeviceNDArray (parsing its
``__cuda_array_interface__``), selects the overload and marshals the arguments through cuda.core: costs
that a call of a few kernels with some thirty arguments each pays on every call (an EFFICIENT call spent
about 1.5 ms of host time on a small problem where PyTorch spends 55 us). A signature here is the kind of
each argument (an array's dtype, rank and contiguity; a scalar's Python or NumPy type; a tuple's
elements), which decides the Numba types and so the compiled kernel and its parameter list: the first
call of a signature goes through Numba (compiling where needed) and records the kernel's function and
argument types; later calls flatten their values straight into a parameter buffer. Under the CUDA
simulator, and without ``KernelConfig.prepared_launches``, everything goes through Numba.

Under ``recording()`` launches are not issued but recorded as (function, grid, block, parameter cells, dynamic
shared memory bytes): what cusdpa's plans of EFFICIENT calls replay (cusdpa.backends.efficient.plan). A
signature first met while recording is compiled there, not launched: a replay may lay an operand out as no
eager call did (the compiled replay's dout, in out's layout).

Flattening (``_encoder``) follows numba.cuda's ``_Kernel._prepare_args``: an array is (meminfo, parent, size, itemsize,
data, *shape, *strides in bytes) with meminfo and parent null; integers, floats and booleans are one
parameter each; tuples are their elements in order. Each parameter travels in an 8-byte cell of which the
driver reads the parameter's own size (little-endian: the low bytes).
"""
from __future__ import annotations

import contextlib
import ctypes
import struct
import threading

import numpy as np
from numba import cuda, types

from . import config
from .device import SIMULATOR
from .layout import kernel_array

_prepared: dict = {}  # (dispatcher, signature) -> _Prepared, or None where Numba's path must serve
_lock = threading.Lock()
_MISS = object()
_MASK64 = (1 << 64) - 1
_recorded = threading.local()  # .launches: the list recording() fills, or None
NOT_PREPARED = "not prepared"  # a recorded launch whose signature only a launch through Numba can prepare
NUMBA_ONLY = "launched by Numba only"  # a recorded launch Numba's own path must serve


@contextlib.contextmanager
def recording():
    """Within the body, this thread's launches are recorded instead of issued: the list yielded gets one entry
    per launch, (function handle, grid (x, y, z), block (x, y, z), parameter cells as ints, dynamic shared memory
    bytes), or NOT_PREPARED /
    NUMBA_ONLY where a launch has no prepared form."""
    launches: list = []
    _recorded.launches = launches
    try:
        yield launches
    finally:
        _recorded.launches = None


def launch(dispatcher, grid, block, device: int, args, smem: int = 0) -> None:
    """``dispatcher[grid, block, stream, smem](*args)`` on ``device`` and CuPy's current stream; arrays in
    ``args`` are given as they are (CuPy arrays, or NumPy ones under the simulator). ``smem``: dynamic shared
    memory bytes (past 48 KiB the kernel's attribute is raised first)."""
    if SIMULATOR:  # (which runs no linked C, so no loop that takes dynamic shared memory)
        dispatcher[grid, block, 0](*(kernel_array(a) if _is_array(a) else a for a in args))
        return
    import cupy

    recorded = getattr(_recorded, "launches", None)
    prepared_launches = config.current().prepared_launches
    if recorded is not None and not prepared_launches:
        recorded.append(NUMBA_ONLY)
        return
    stream = cupy.cuda.get_current_stream().ptr
    if not prepared_launches:
        _through_numba(dispatcher, grid, block, device, stream, args, smem)
        return
    args = [cupy.from_dlpack(a) if _is_array(a) and not hasattr(a, "__cuda_array_interface__") else a for a in args]
    # the device too: a kernel compiled for one device's architecture may not load on another's
    key = (dispatcher, device, tuple(_kind(a) for a in args))
    prepared = _prepared.get(key, _MISS)
    if recorded is not None:
        if prepared is _MISS:  # a signature no call has launched yet (a replay's own layout): compiled here
            prepared = _prepare(dispatcher, device, key, args, smem)
        recorded.append(NOT_PREPARED if prepared is _MISS else NUMBA_ONLY if prepared is None else
                        (prepared.fn, _dims(grid), _dims(block), prepared.cells(args), smem))
        return
    if prepared is _MISS or prepared is None:  # the first call of this signature, or one Numba must serve
        wrapped = _through_numba(dispatcher, grid, block, device, stream, args, smem)
        if prepared is _MISS:
            with cuda.gpus[device], _lock:
                try:
                    _prepared[key] = _Prepared.of(dispatcher, wrapped)
                except Exception:  # noqa: BLE001 -- whatever Numba's internals hold, its own path serves
                    _prepared[key] = None
        return
    from cupy.cuda import driver, runtime

    current = runtime.getDevice()
    if current == device and driver.ctxGetCurrent() != 0:
        prepared(grid, block, stream, args, smem, device)
        return
    # A thread can have a current device but no current context (torch's autograd threads select the device
    # lazily; cusdpa/backends/launch.py met it): cudaSetDevice makes the device's primary context current.
    runtime.setDevice(device)
    try:
        prepared(grid, block, stream, args, smem, device)
    finally:
        if current != device:
            runtime.setDevice(current)


def _prepare(dispatcher, device: int, key, args, smem: int):
    """The _Prepared of ``args``' signature without launching it: Numba compiles the overload (as its first
    launch would) and a kernel taking more than 48 KiB of dynamic shared memory has its limit raised, so a
    plan recorded from it replays as one recorded after a launch. _MISS where compiling outside a launch
    fails (a kernel Numba specialises per launch configuration): the general path's launch prepares it."""
    with cuda.gpus[device], _lock:
        wrapped = [kernel_array(a) if _is_array(a) else a for a in args]
        try:
            dispatcher.compile(tuple(dispatcher.typeof_pyval(a) for a in wrapped))
            prepared = _Prepared.of(dispatcher, wrapped)
        except Exception:  # noqa: BLE001 -- whatever Numba's internals hold, a launch through it prepares
            return _MISS
        if prepared is not None and smem > STATIC_SHARED:
            _allow_shared(prepared.fn, smem, device)
        _prepared[key] = prepared
    return prepared


STATIC_SHARED = 48 * 1024  # dynamic shared memory a kernel may take without raising its attribute
_MAX_DYNAMIC_SHARED = 8  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
_raised: set = set()  # (kernel handle, bytes, device) whose dynamic shared memory attribute was raised


def _through_numba(dispatcher, grid, block, device: int, stream: int, args, smem: int = 0) -> list:
    """Numba's own launch of ``args`` (arrays wrapped without a copy or a sync, in the device's context), with
    ``smem`` bytes of dynamic shared memory; the arguments as given to it."""
    with cuda.gpus[device]:
        wrapped = [kernel_array(a) if _is_array(a) else a for a in args]
        if smem > STATIC_SHARED:  # the overload compiled first (Numba raises no attribute), then its limit raised
            kernel = dispatcher.compile(tuple(dispatcher.typeof_pyval(a) for a in wrapped))
            _allow_shared(int(kernel._codelibrary.get_cufunc().handle), smem, device)
        dispatcher[grid, block, cuda.external_stream(stream) if stream else cuda.default_stream(), smem](*wrapped)
    return wrapped


def _allow_shared(fn: int, smem: int, device: int) -> None:
    """Raise kernel ``fn``'s dynamic shared memory limit to ``smem`` bytes on ``device``. Numba's functions are
    library kernels (cuda.core loads modules with cuLibraryLoadData): a CUkernel handle, which cuLaunchKernel takes
    but cuFuncSetAttribute refuses (CUDA_ERROR_INVALID_HANDLE, H100): cuKernelSetAttribute sets it per device."""
    if (fn, smem, device) in _raised:
        return
    lib = ctypes.CDLL("libcuda.so.1")
    ordinal = ctypes.c_int(0)
    err = lib.cuDeviceGet(ctypes.byref(ordinal), ctypes.c_int(device)) or lib.cuKernelSetAttribute(
        ctypes.c_int(_MAX_DYNAMIC_SHARED), ctypes.c_int(smem), ctypes.c_void_p(fn), ordinal)
    if err:
        raise RuntimeError(f"raising a kernel's dynamic shared memory to {smem} bytes failed (CUresult {err})")
    _raised.add((fn, smem, device))


def _is_array(a) -> bool:
    return hasattr(a, "shape") and hasattr(a, "dtype") and not isinstance(a, np.generic)


def _kind(a):
    """What decides an argument's Numba type (hashable, cheap: Python ints and tuples, most of a launch's
    arguments, are told apart by their type alone)."""
    kind = type(a)
    if kind is int:
        return (int, 64) if a >= 1 << 63 else int  # Numba types those uint64
    if isinstance(a, tuple):
        return tuple(map(_kind, a))
    if _is_array(a):
        flags = a.flags
        return a.dtype, a.ndim, flags.c_contiguous, flags.f_contiguous
    return kind


class _Prepared:
    """The compiled function of one signature and its argument types; calling it launches."""

    __slots__ = ("fn", "argtypes", "_encoders", "_buffers")

    def __init__(self, fn: int, argtypes: tuple):
        self.fn, self.argtypes = fn, argtypes
        self._encoders = tuple(map(_encoder, argtypes))
        self._buffers: dict = {}  # thread id -> (cells, pointers), one per thread that ever launched it

    @classmethod
    def of(cls, dispatcher, wrapped):
        """After Numba launched ``wrapped``: the overload it used, or None where this dispatcher picks one per
        launch configuration (Numba's path then serves every call)."""
        if getattr(dispatcher, "_launch_config_sensitive", True):
            return None
        argtypes = tuple(dispatcher.typeof_pyval(a) for a in wrapped)
        kernel = dispatcher.overloads.get(argtypes)
        if kernel is None or getattr(kernel, "cooperative", True) or getattr(kernel, "debug", True) \
                or not all(map(_flattens, argtypes)):
            return None
        return cls(int(kernel._codelibrary.get_cufunc().handle), argtypes)

    def cells(self, args) -> list:
        """The parameter cells of ``args``."""
        values: list = []
        for encode, value in zip(self._encoders, args):
            encode(value, values)
        return values

    def __call__(self, grid, block, stream: int, args, smem: int = 0, device: int = 0) -> None:
        values = self.cells(args)
        cells, params = self._buffer(len(values))
        cells[:len(values)] = values
        gx, gy, gz = _dims(grid)
        bx, by, bz = _dims(block)
        from cupy.cuda import driver

        if smem > STATIC_SHARED:
            _allow_shared(self.fn, smem, device)
        driver.launchKernel(self.fn, gx, gy, gz, bx, by, bz, smem, stream, params, 0)

    def _buffer(self, n: int):
        # one parameter buffer per thread, made once (a signature's parameter count is fixed): the driver
        # copies the parameters during the call, so the buffer may be refilled right after
        key = threading.get_ident()
        buf = self._buffers.get(key)
        if buf is None:
            cells = (ctypes.c_uint64 * max(n, 1))()
            pointers = (ctypes.c_void_p * max(n, 1))(*(ctypes.addressof(cells) + 8 * i for i in range(n)))
            buf = self._buffers[key] = (cells, ctypes.addressof(pointers), pointers)
        return buf[0], buf[1]


def _dims(d) -> tuple:
    d = tuple(d) if isinstance(d, tuple) else (d,)
    return d + (1,) * (3 - len(d))


def _flattens(ty) -> bool:
    """Whether ``_encoder`` takes arguments of Numba type ``ty``."""
    if isinstance(ty, types.BaseTuple):
        return all(map(_flattens, ty))
    return isinstance(ty, (types.Array, types.Integer)) or ty in (types.boolean, types.float32, types.float64)


def _encoder(ty):
    """A function appending the parameter cells of a value of Numba type ``ty`` to a list: a contiguous layout's
    strides as Numba computes them from the shape, others as the array holds them. The type's decisions are
    made here, once per signature, so a launch only reads its values."""
    if isinstance(ty, types.Array):
        if ty.layout not in "CF":
            def strided(value, out):
                out += (0, 0, value.size, value.itemsize, value.data.ptr, *value.shape)
                out += [s & _MASK64 for s in value.strides]
            return strided
        order = tuple(reversed(range(ty.ndim))) if ty.layout == "C" else tuple(range(ty.ndim))

        def contiguous(value, out):
            shape, inner = value.shape, value.itemsize
            strides = [0] * len(shape)
            for n in order:
                strides[n] = inner
                inner *= shape[n]
            out += (0, 0, value.size, value.itemsize, value.data.ptr, *shape)
            out += strides
        return contiguous
    if isinstance(ty, types.BaseTuple):
        if all(isinstance(t, types.Integer) for t in ty):
            return lambda value, out: out.extend([int(x) & _MASK64 for x in value])
        parts = tuple(map(_encoder, ty))

        def elements(value, out):
            for encode, x in zip(parts, value):
                encode(x, out)
        return elements
    if ty == types.boolean:
        return lambda value, out: out.append(1 if value else 0)
    if isinstance(ty, types.Integer):
        return lambda value, out: out.append(int(value) & _MASK64)
    if ty == types.float32:
        return lambda value, out: out.append(_F32.unpack(_F32_BITS.pack(value))[0])
    return lambda value, out: out.append(_F64.unpack(_F64_BITS.pack(value))[0])  # float64, as _flattens allows


_F32, _F32_BITS, _F64, _F64_BITS = struct.Struct("<I"), struct.Struct("<f"), struct.Struct("<Q"), struct.Struct("<d")
