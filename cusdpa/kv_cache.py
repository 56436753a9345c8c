"""Attention over a KV cache (inference): new keys and values written into the cache in place, then each
sequence's queries attend to its cached keys, FlashAttention's ``flash_attn_with_kvcache`` semantics.

Layouts (FlashAttention's, token-major): query (B, Lq, Hq, E); a contiguous cache k_cache (B_cache, S_max,
Hkv, E), v_cache (B_cache, S_max, Hkv, Ev), sequence b in row ``cache_batch_idx[b]`` (default b); or a
paged cache (num_blocks, block_size, Hkv, E) whose sequence b holds its positions p in block
``block_table[b, p // block_size]`` at slot ``p % block_size``. ``cache_seqlens[b]`` tokens of sequence b
are in the cache before the call (None: the whole capacity); new ``key``/``value`` (B, Lnew, Hkv, E/Ev)
go to positions ``cache_seqlens[b]`` onwards, and the queries then attend to the first ``cache_seqlens[b]
+ Lnew`` positions, causal and window aligned bottom-right (the last query with the last key). Output
(B, Lq, Hq, Ev); lse (B, Hq, Lq).

On CuPy fp16/bf16 arrays the tensor-core split-KV kernels (kernels_cuda/flash_decode.cu, planned in
backends/flash/decode.py) take the call where they can (up to 16 query rows per kv head, head dims multiples
of 8 up to 256, 16-byte rows): they append the new tokens and read the cache in place through the block
table, and nothing on the host waits for the GPU, since lengths, block table and batch rows given as device
arrays are read by the kernels only (their values are not checked, as FlashAttention does not check them;
lengths past the capacity are clamped to it). Otherwise a host plan (which cache cells are written and read)
is made from the lengths and the block table, the new tokens are moved with the array type's own indexing,
and the Numba split-KV kernels of kernels_numba/decode.py (CuPy fp32, or NumPy arrays under Numba's CUDA
simulator) read the cache in place; failing those, each sequence's visible cells are gathered into a packed
copy for variable-length attention (the reference on NumPy arrays).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .api import varlen_attention
from .errors import ArgumentError, ArgumentTypeError
from .problem import array_module


@dataclass(frozen=True)
class CachePlan:
    """Host indices of one call: the cells the new tokens go to (row, slot) in token order, the cells each
    sequence attends to, concatenated, and the packed keys' cu_seqlens."""

    write_rows: np.ndarray
    write_slots: np.ndarray
    read_rows: np.ndarray
    read_slots: np.ndarray
    cu_seqlens_k: np.ndarray  # int32 (B + 1,)
    max_seqlen_k: int


def _host_ints(x, name: str, shape: tuple | None = None) -> np.ndarray:
    """An integer array argument (NumPy, CuPy or torch) as a host int64 array, its shape checked."""
    if hasattr(x, "get") and not isinstance(x, np.ndarray):  # CuPy
        x = x.get()
    elif hasattr(x, "detach"):  # torch
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.dtype.kind not in "iu":
        raise ArgumentTypeError(f"{name}.dtype={a.dtype} must be an integer dtype (int32 as FlashAttention's)")
    if shape is not None and a.shape != shape:
        raise ArgumentError(f"{name}.shape={a.shape} must be {shape}")
    return a.astype(np.int64)


def check_shapes(query_shape, k_cache_shape, v_cache_shape, new_shape, table_shape, has_batch_idx: bool) -> tuple:
    """Check the shapes of one call (``new_shape``: key's shape, or None; ``table_shape``: the block table's, or
    None); returns (new tokens, capacity of a sequence in positions)."""
    if len(query_shape) != 4:
        raise ArgumentError(f"query.shape={tuple(query_shape)} must be (batch, queries, heads, head_dim)")
    B, _, hq, E = query_shape
    for name, shape in (("k_cache", k_cache_shape), ("v_cache", v_cache_shape)):
        if len(shape) != 4:
            raise ArgumentError(f"{name}.shape={tuple(shape)} must be (batch or blocks, positions, kv heads, head_dim)")
    rows, per_row, hkv, Ek = k_cache_shape
    if tuple(v_cache_shape[:3]) != (rows, per_row, hkv):
        raise ArgumentError(f"k_cache.shape={tuple(k_cache_shape)} and v_cache.shape={tuple(v_cache_shape)} must "
                            "agree but in the head dim")
    if Ek != E:
        raise ArgumentError(f"query head dim {E} and k_cache head dim {Ek} must be equal")
    if hkv == 0 or hq % hkv:
        raise ArgumentError(f"query has {hq} heads and the cache {hkv}: Hq must be a multiple of Hkv")
    new = 0
    if new_shape is not None:
        if len(new_shape) != 4 or new_shape[0] != B or new_shape[2] != hkv or new_shape[3] != E:
            raise ArgumentError(f"key.shape={tuple(new_shape)} must be (B={B}, new tokens, Hkv={hkv}, E={E})")
        new = new_shape[1]
    if table_shape is None:
        return new, per_row
    if has_batch_idx:
        raise ArgumentError("cache_batch_idx and block_table exclude each other: a paged cache's rows are blocks")
    if len(table_shape) != 2 or table_shape[0] != B:
        raise ArgumentError(f"block_table.shape={tuple(table_shape)} must be (B={B}, blocks per sequence)")
    return new, table_shape[1] * per_row


def _lengths(cache_seqlens, B: int, new: int, capacity: int) -> np.ndarray | None:
    """The cached lengths as host int64 (B,) checked against the capacity, or None when they live on the device
    (a CuPy array: reading them would wait for the GPU; the kernels clamp them instead)."""
    if cache_seqlens is None:
        lengths = np.full(B, capacity - new, dtype=np.int64)
    elif isinstance(cache_seqlens, (int, np.integer)) and not isinstance(cache_seqlens, bool):
        lengths = np.full(B, int(cache_seqlens), dtype=np.int64)
    elif type(cache_seqlens).__module__.split(".")[0] == "cupy":
        return None
    else:
        lengths = _host_ints(cache_seqlens, "cache_seqlens", (B,))
    if lengths.size and (lengths.min() < 0 or lengths.max() + new > capacity):
        raise ArgumentError(f"cache_seqlens + new tokens ({new}) must lie in [0, {capacity}] (the cache's capacity "
                            "per sequence)")
    return lengths


def plan(query_shape, k_cache_shape, v_cache_shape, new_shape, cache_seqlens, block_table, cache_batch_idx) -> CachePlan:
    """Check the shapes of one call and make its CachePlan (``new_shape``: key's shape, or None)."""
    B = query_shape[0] if len(query_shape) == 4 else 0
    table = None if block_table is None else _host_ints(block_table, "block_table")
    new, capacity = check_shapes(query_shape, k_cache_shape, v_cache_shape, new_shape,
                                 None if table is None else table.shape, cache_batch_idx is not None)
    rows, per_row = k_cache_shape[:2]
    if table is not None:
        if table.size and (table.min() < 0 or table.max() >= rows):
            raise ArgumentError(f"block_table holds blocks outside [0, {rows})")
    else:
        index = np.arange(B) if cache_batch_idx is None else _host_ints(cache_batch_idx, "cache_batch_idx", (B,))
        if index.size and (index.min() < 0 or index.max() >= rows):
            raise ArgumentError(f"cache_batch_idx holds rows outside [0, {rows})")
    lengths = _lengths(cache_seqlens, B, new, capacity)
    if lengths is None:
        lengths = _host_ints(cache_seqlens, "cache_seqlens", (B,))
        _lengths(lengths, B, new, capacity)

    def cells(positions_of):  # (rows, slots) of each sequence's positions, concatenated
        r, s = [], []
        for b in range(B):
            p = positions_of(b)
            if block_table is not None:
                r.append(table[b, p // per_row])
                s.append(p % per_row)
            else:
                r.append(np.full(len(p), index[b]))
                s.append(p)
        return (np.concatenate(r).astype(np.int64), np.concatenate(s).astype(np.int64)) if B else \
            (np.zeros(0, np.int64), np.zeros(0, np.int64))

    write_rows, write_slots = cells(lambda b: lengths[b] + np.arange(new))
    seen = lengths + new
    read_rows, read_slots = cells(lambda b: np.arange(seen[b]))
    cu = np.concatenate([[0], np.cumsum(seen)]).astype(np.int32)
    return CachePlan(write_rows, write_slots, read_rows, read_slots, cu, int(seen.max(initial=0)))


def kv_cache_attention(query, k_cache, v_cache, cache_seqlens=None, key=None, value=None, *, block_table=None,
                       cache_batch_idx=None, is_causal=False, scale=None, window=None, softcap=0.0,
                       alibi_slopes=None, return_lse=False):
    """Write ``key``/``value`` into the cache at ``cache_seqlens`` (in place), then attend (module docstring
    for the layouts); NumPy or CuPy arrays. ``window=(left, right)`` (-1 = unbounded), ``softcap`` and
    ``alibi_slopes`` ((Hq,) or (B, Hq)) as in ``varlen_attention``. Returns out, or (out, lse) with
    ``return_lse``."""
    xp = array_module(query, "query")
    if (key is None) != (value is None):
        raise ArgumentError("key and value go together: pass both new tensors or neither")
    if key is not None:
        if value.shape[:3] != key.shape[:3] or value.shape[3] != v_cache.shape[3]:
            raise ArgumentError(f"value.shape={tuple(value.shape)} must be key's but in the head dim "
                                f"Ev={v_cache.shape[3]}")
        for name, x, cache in (("key", key, k_cache), ("value", value, v_cache)):
            if array_module(x, name) is not xp or x.dtype != cache.dtype:
                raise ArgumentTypeError(f"{name} must be a {xp.__name__} array of the cache's dtype {cache.dtype}")
    if xp is not np:
        done = _flash_decode(query, k_cache, v_cache, cache_seqlens, key, value, block_table, cache_batch_idx,
                             is_causal, scale, window, softcap, alibi_slopes)
        if done is not None:
            return done if return_lse else done[0]
    pl = plan(query.shape, k_cache.shape, v_cache.shape, None if key is None else key.shape, cache_seqlens,
              block_table, cache_batch_idx)
    if key is not None:
        rows, slots = xp.asarray(pl.write_rows), xp.asarray(pl.write_slots)
        k_cache[rows, slots] = key.reshape((-1,) + tuple(key.shape[2:]))
        v_cache[rows, slots] = value.reshape((-1,) + tuple(value.shape[2:]))
    B, Lq, hq, _ = query.shape
    if _decode_kernels(xp, query, k_cache, v_cache):
        return _decode(xp, query, k_cache, v_cache, pl, block_table, cache_batch_idx, is_causal, scale, window,
                       softcap, alibi_slopes, return_lse)
    rows, slots = xp.asarray(pl.read_rows), xp.asarray(pl.read_slots)
    out, lse = varlen_attention(query.reshape((B * Lq,) + tuple(query.shape[2:])), k_cache[rows, slots],
                                v_cache[rows, slots], xp.asarray(np.arange(B + 1, dtype=np.int32) * Lq),
                                xp.asarray(pl.cu_seqlens_k), Lq, pl.max_seqlen_k, is_causal=is_causal, scale=scale,
                                enable_gqa=hq != k_cache.shape[2], causal_variant="lower_right", window=window,
                                softcap=softcap, alibi_slopes=alibi_slopes, return_lse=True)
    out = out.reshape((B, Lq) + tuple(out.shape[1:]))
    return (out, lse.reshape(hq, B, Lq).transpose(1, 0, 2)) if return_lse else out


def _decode_kernels(xp, query, k_cache, v_cache) -> bool:
    """Whether the split-KV kernels (kernels_numba/decode.py) run this call: CuPy arrays (or NumPy ones under
    Numba's CUDA simulator) of shapes and a dtype they take."""
    from . import environment

    if xp.__name__ == "numpy" and not environment.simulator_enabled():
        return False
    if query.dtype != k_cache.dtype or k_cache.dtype != v_cache.dtype:
        return False
    from kernels_numba import decode

    return decode.applies(query.shape, k_cache.shape, v_cache.shape, np.dtype(query.dtype).name)


def _decode(xp, query, k_cache, v_cache, pl, block_table, cache_batch_idx, is_causal, scale, window, softcap,
            alibi_slopes, return_lse):
    """kv_cache_attention on the split-KV kernels: the cache read in place through the block table."""
    from kernels_numba import decode

    from .problem import check_alibi, checked_scalars, device_of

    B, Lq, hq, E = query.shape
    causal, window, scale, softcap = checked_scalars(is_causal, scale, window, softcap, E)
    left, right = window if window is not None else (-1, -1)
    slopes = None
    if alibi_slopes is not None:
        check_alibi(alibi_slopes, xp, (B, hq), device_of(query))
        slopes = xp.ascontiguousarray(xp.broadcast_to(alibi_slopes, (B, hq)))
    seqlens = np.diff(pl.cu_seqlens_k).astype(np.int32)
    table = None if block_table is None else xp.asarray(block_table, dtype=np.int32)
    rows_of = None if block_table is not None else xp.asarray(
        np.arange(B, dtype=np.int32) if cache_batch_idx is None else np.asarray(_host_ints(cache_batch_idx,
                                                                                          "cache_batch_idx")),
        dtype=np.int32)
    out, lse = decode.run(xp, query, k_cache, v_cache, table, rows_of, xp.asarray(seqlens), pl.max_seqlen_k, slopes,
                          causal=causal, left=left, right=right, scale=scale, softcap=softcap)
    out = out.astype(query.dtype)
    return (out, lse) if return_lse else out


def flash_decode_plan(query, k_cache, v_cache, key, value, table_shape, paged: bool, has_batch_idx: bool,
                      has_seqlens: bool, is_causal, scale, window, softcap, alibi_slopes):
    """The DecodePlan (backends/flash/decode.py) of a call on CuPy arrays, or None when those kernels do not take
    it; what it checks (shapes, dtypes, options, the slopes' shape) is what the plan's signature fixes.
    ``table_shape``: the block table's shape or None; ``has_seqlens``: the lengths come as a device int32 array."""
    import cupy

    from .backends.flash import decode, sources
    from .problem import check_alibi, checked_scalars

    device = query.device.id
    arrays = (query, k_cache, v_cache) + (() if key is None else (key, value))
    if any(type(x) is not cupy.ndarray or x.device.id != device or x.dtype != query.dtype for x in arrays):
        return None

    def operand(x):
        return decode.Operand(x.shape, tuple(s // x.itemsize for s in x.strides), x.data.ptr % 16 == 0)

    new, capacity = check_shapes(query.shape, k_cache.shape, v_cache.shape, None if key is None else key.shape,
                                 table_shape, has_batch_idx)
    q, kc, vc = operand(query), operand(k_cache), operand(v_cache)
    kn, vn = (None, None) if key is None else (operand(key), operand(value))
    if not decode.applies(query.dtype.name, q, kc, vc, kn, vn, sources.compute_capability(device)):
        return None
    causal, window, scale, softcap = checked_scalars(is_causal, scale, window, softcap, query.shape[3])
    check_alibi(alibi_slopes, cupy, query.shape[0:3:2], f"cuda:{device}")
    left, right = window if window is not None else (-1, -1)
    return decode.build(device, query.dtype.name, q, kc, vc, capacity, table_shape[1] if paged else 0, paged, kn, vn,
                        has_seqlens, alibi_slopes is not None, (left, 0 if causal else right), scale, softcap)


def _flash_decode(query, k_cache, v_cache, cache_seqlens, key, value, block_table, cache_batch_idx, is_causal, scale,
                  window, softcap, alibi_slopes):
    """(out, lse) of a call on CuPy arrays through the tensor-core split-KV kernels, or None when they do not
    take it. Nothing here waits for the GPU: lengths, block table and batch rows given as CuPy arrays are read
    by the kernels only (their values are not checked; lengths past the capacity are clamped to it), host
    ones are checked first."""
    import cupy

    def device_ints(x, name, shape=None):  # a host or device integer argument as a device int32 array
        if type(x) is not cupy.ndarray:
            return cupy.asarray(_host_ints(x, name, shape).astype(np.int32))
        if x.dtype.kind not in "iu":
            raise ArgumentTypeError(f"{name}.dtype={x.dtype} must be an integer dtype (int32 as FlashAttention's)")
        if shape is not None and x.shape != shape:
            raise ArgumentError(f"{name}.shape={x.shape} must be {shape}")
        return cupy.ascontiguousarray(x, dtype=np.int32)

    if not isinstance(query, cupy.ndarray) or not isinstance(k_cache, cupy.ndarray):
        return None
    B, _, hq, _ = query.shape if query.ndim == 4 else (0, 0, 0, 0)
    rows = k_cache.shape[0]
    with cupy.cuda.Device(query.device.id):
        table = 0
        if block_table is not None:
            table = device_ints(block_table, "block_table")
            if type(block_table) is not cupy.ndarray and table.size:
                host = _host_ints(block_table, "block_table")
                if host.min() < 0 or host.max() >= rows:
                    raise ArgumentError(f"block_table holds blocks outside [0, {rows})")
        elif cache_batch_idx is not None:
            if type(cache_batch_idx) is not cupy.ndarray:
                index = _host_ints(cache_batch_idx, "cache_batch_idx", (B,))
                if index.size and (index.min() < 0 or index.max() >= rows):
                    raise ArgumentError(f"cache_batch_idx holds rows outside [0, {rows})")
            table = device_ints(cache_batch_idx, "cache_batch_idx", (B,))
        new, capacity = check_shapes(query.shape, k_cache.shape, v_cache.shape, None if key is None else key.shape,
                                     None if block_table is None else table.shape, cache_batch_idx is not None)
        lengths = _lengths(cache_seqlens, B, new, capacity)
        seqlens, fixed_len = 0, 0
        if lengths is None:
            seqlens = device_ints(cache_seqlens, "cache_seqlens", (B,))
        elif lengths.size and np.all(lengths == lengths[0]):
            fixed_len = int(lengths[0])
        else:
            seqlens = cupy.asarray(lengths.astype(np.int32))
        pl = flash_decode_plan(query, k_cache, v_cache, key, value, None if block_table is None else table.shape,
                               block_table is not None, cache_batch_idx is not None, type(seqlens) is not int,
                               is_causal, scale, window, softcap, alibi_slopes)
        if pl is None:
            return None
        slopes = 0 if alibi_slopes is None else cupy.ascontiguousarray(cupy.broadcast_to(alibi_slopes, (B, hq)))
        out = cupy.empty(pl.out_shape, dtype=query.dtype)
        lse = cupy.empty(pl.lse_shape, dtype=np.float32)
        part = cupy.empty(pl.workspace_floats, dtype=np.float32) if pl.part_floats else None

        def ptr(x):
            return 0 if x is None or type(x) is int else x.data.ptr

        pl.run(cupy.cuda.get_current_stream().ptr, query.data.ptr, k_cache.data.ptr, v_cache.data.ptr, ptr(table),
               ptr(seqlens), ptr(slopes), ptr(key), ptr(value), fixed_len, out.data.ptr, lse.data.ptr, ptr(part))
    return out, lse
