"""TMA tensor maps (CUtensorMap) of the Hopper forward's operands, encoded by the CUDA driver.

``cuTensorMapEncodeTiled`` is called through ctypes on the driver library CuPy already loaded (no extra
dependency). A map names a global address, so a prepared launch would need a new map per call; instead
``TensorMap`` encodes once and, per call, writes the new address into the map's bytes at the offset where
the encoding keeps it. That offset is the driver's, the same for every map: it is found once per process,
by encoding the first map at a second address and comparing; should a driver encode differently (the
address not stored verbatim, or other bytes depending on it), every call encodes afresh.
"""
from __future__ import annotations

import ctypes
import functools

MAP_BYTES = 128
_DTYPE = {"float16": 6, "bfloat16": 9}  # CU_TENSOR_MAP_DATA_TYPE_FLOAT16, _BFLOAT16
_SWIZZLE = {64: 2, 128: 3}  # CU_TENSOR_MAP_SWIZZLE_64B, _128B, by bytes per swizzled row
_L2_PROMOTION_256B, _INTERLEAVE_NONE, _OOB_FILL_ZERO = 3, 0, 0
# An aligned address to encode a map's template with where the operand is not known until the call (a
# result the call allocates): encoding reads no memory, and every call writes its own address (``write``).
ANY_ADDRESS = 1 << 32


@functools.cache
def _encoder():
    lib = ctypes.CDLL("libcuda.so.1")
    fn = lib.cuTensorMapEncodeTiled
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint64),
                   ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32),
                   ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return fn


def encode(dtype_name: str, ptr: int, dims, strides_bytes, box) -> bytes:
    """The 128 bytes of a tiled map over a tensor at ``ptr``: ``dims`` innermost first, ``strides_bytes``
    of dims 1.. (the innermost is contiguous), ``box`` the tile each copy moves (its rows of 64 or 128
    bytes swizzled at that width), zeros outside the tensor."""
    rank = len(dims)
    out = (ctypes.c_uint64 * (MAP_BYTES // 8))()  # 8-byte aligned; the driver asks 64 only of device copies
    err = _encoder()(ctypes.addressof(out), _DTYPE[dtype_name], rank, ctypes.c_void_p(ptr),
                     (ctypes.c_uint64 * rank)(*dims), (ctypes.c_uint64 * (rank - 1))(*strides_bytes),
                     (ctypes.c_uint32 * rank)(*box), (ctypes.c_uint32 * rank)(*([1] * rank)), _INTERLEAVE_NONE,
                     _SWIZZLE[box[0] * 2], _L2_PROMOTION_256B, _OOB_FILL_ZERO)
    if err != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed (CUresult {err}) for dims {dims}, strides {strides_bytes} "
                           f"bytes, box {box}")
    return bytes(out)


def _address_offset(a: bytes, b: bytes, ptr_a: int, ptr_b: int) -> int | None:
    """Where two encodings at ``ptr_a`` and ``ptr_b`` keep the address verbatim, if they differ nowhere else."""
    for off in range(0, MAP_BYTES - 7, 8):
        if int.from_bytes(a[off:off + 8], "little") == ptr_a and int.from_bytes(b[off:off + 8], "little") == ptr_b \
                and a[:off] == b[:off] and a[off + 8:] == b[off + 8:]:
            return off
    return None


_DRIVER: dict = {}  # probed once: "address_offset" -> where this driver's maps keep the address, or None


class TensorMap:
    """A map of one operand's shape, strides and box, for any address: ``template`` holds the map of some
    address, kept at byte ``offset`` (None: the driver does not keep it verbatim, and ``write`` encodes the
    whole map of each address). A prepared launch stores each call's address at ``offset`` of its copy of
    the template (``backends.launch.Launch``)."""

    __slots__ = ("args", "template", "offset")

    def __init__(self, dtype_name: str, ptr: int, dims, strides_bytes, box):
        self.args = (dtype_name, tuple(dims), tuple(strides_bytes), tuple(box))
        self.template = encode(dtype_name, ptr, *self.args[1:])
        if "address_offset" not in _DRIVER:
            other = ptr + (1 << 20)
            _DRIVER["address_offset"] = _address_offset(self.template, encode(dtype_name, other, *self.args[1:]),
                                                        ptr, other)
        self.offset = _DRIVER["address_offset"]

    def write(self, dst: int, ptr: int) -> None:
        """The map of the tensor at ``ptr`` into the 128 bytes at host address ``dst``."""
        ctypes.memmove(dst, encode(self.args[0], ptr, *self.args[1:]), MAP_BYTES)


def operand_map(dtype_name: str, ptr: int, D: int, rows: int, heads: int, batch: int, strides, box_rows: int,
                box_cols: int | None = None):
    """(TensorMap, head multiplier, batch multiplier) of a (batch, heads, rows, D) operand with element
    strides (batch, head, row) and 2-byte elements, boxes of ``box_rows`` rows and ``box_cols`` columns: by
    default 64 (32 when D is not a multiple of 64), the kernel's swizzle of such tiles being 128 (64) bytes
    wide. A head or batch
    dim that is broadcast (stride 0) or single becomes a dim of size 1 that the kernel addresses with
    coordinate 0 (multiplier 0)."""
    sb, sh, sm = (int(s) * 2 for s in strides)
    hm = int(heads > 1 and sh != 0)
    bm = int(batch > 1 and sb != 0)
    rows = max(rows, 1)  # no keys: the kernel loads nothing, but the map must describe some tensor
    dims = [D, rows, heads if hm else 1, batch if bm else 1]
    sm = sm if rows > 1 else (D * 2 + 15) // 16 * 16  # a single row's stride is arbitrary
    row_bytes = rows * sm
    # A dim of size 1 is never stepped over; any stride the driver accepts serves (a multiple of 16).
    sh = sh if hm else max(16, (row_bytes + 15) // 16 * 16)
    sb = sb if bm else max(16, (dims[2] * sh + 15) // 16 * 16)
    box_cols = box_cols or (64 if D % 64 == 0 else 32)
    return TensorMap(dtype_name, ptr, dims, [sm, sh, sb], [box_cols, box_rows, 1, 1]), hm, bm
