"""kernels_numba.launcher on the CPU: the parameter cells a prepared launch writes for each Numba argument type,
and the signature that decides them. The launch itself, against Numba's own, is a GPU test
(tests/test_efficient_gpu.py::test_repeated_calls_launch_prepared_kernels)."""
import struct
from types import SimpleNamespace

import numpy as np
from numba import types

from kernels_numba import launcher


def _device_array(shape, strides, dtype=np.float32, ptr=0x7000_0000):
    """What _encoder's functions read of a CuPy array: size, itemsize, data.ptr, shape, strides (bytes)."""
    return SimpleNamespace(size=int(np.prod(shape)), itemsize=np.dtype(dtype).itemsize, data=SimpleNamespace(ptr=ptr),
                           shape=tuple(shape), strides=tuple(strides), ndim=len(shape))


def _cells(ty, value):
    out = []
    launcher._encoder(ty)(value, out)
    return out


def test_an_array_is_numbas_struct_with_strides_by_layout():
    # (meminfo, parent, size, itemsize, data, *shape, *strides): a contiguous layout's strides from the shape,
    # as Numba computes them (a size-1 dim's stride in the view does not matter), an "A" one's as held
    c = _device_array((2, 1, 3), (12, 999, 4))
    assert _cells(types.Array(types.float32, 3, "C"), c) == [0, 0, 6, 4, 0x7000_0000, 2, 1, 3, 12, 12, 4]
    f = _device_array((2, 3), (4, 8))
    assert _cells(types.Array(types.float32, 2, "F"), f) == [0, 0, 6, 4, 0x7000_0000, 2, 3, 4, 8]
    a = _device_array((2, 3), (-24, 8), dtype=np.float64)
    assert _cells(types.Array(types.float64, 2, "A"), a) == [0, 0, 6, 8, 0x7000_0000, 2, 3, (1 << 64) - 24, 8]


def test_scalars_fill_the_low_bytes_of_their_cell():
    assert _cells(types.int64, -2) == [(1 << 64) - 2]
    assert _cells(types.int32, np.int32(7)) == [7]
    assert _cells(types.boolean, True) == [1] and _cells(types.boolean, np.bool_(False)) == [0]
    assert _cells(types.float32, np.float32(1.5)) == [struct.unpack("<I", struct.pack("<f", 1.5))[0]]
    assert _cells(types.float64, 0.1) == [struct.unpack("<Q", struct.pack("<d", 0.1))[0]]
    # tuples are their elements in order
    assert _cells(types.UniTuple(types.int64, 3), (1, 2, 3)) == [1, 2, 3]
    assert _cells(types.Tuple((types.int64, types.float32)), (4, np.float32(2.0))) == \
        [4, struct.unpack("<I", struct.pack("<f", 2.0))[0]]


def test_only_flattened_types_are_prepared():
    assert launcher._flattens(types.UniTuple(types.int64, 5))
    assert launcher._flattens(types.Array(types.uint16, 6, "A"))
    assert not launcher._flattens(types.complex64)
    assert not launcher._flattens(types.Tuple((types.int64, types.complex128)))


def test_the_signature_tells_what_decides_the_numba_types():
    x = np.zeros((2, 3), np.float32)
    assert launcher._kind(x) == (np.dtype(np.float32), 2, True, False)
    assert launcher._kind(x.T) == (np.dtype(np.float32), 2, False, True)
    assert launcher._kind(x[:, ::2]) == (np.dtype(np.float32), 2, False, False)
    assert launcher._kind((1, 2.0, True)) == (int, float, bool)
    assert launcher._kind(np.float32(1)) is np.float32
