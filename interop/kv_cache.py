"""``kv_cache_attention`` on torch tensors: ``cusdpa.kv_cache_attention`` (its semantics, layouts and
kernels: cusdpa/kv_cache.py) on zero-copy array views of the tensors, the cache written in place, on
torch's current stream. Inference only, as FlashAttention's ``flash_attn_with_kvcache``: no gradient
flows.

A CUDA call that the split-KV decode kernels take replays a plan cached per signature (shapes, strides,
dtypes, devices, alignment, options) on raw pointers, as the attention ops do: a decode step is a few
microseconds of host work and never waits for the GPU (lengths and block table stay on the device). Other
calls (CPU tensors, fp32, lengths as int64 or on the host ...) take the general path, whose plan reads the
lengths and block table on the host."""
from __future__ import annotations

import numpy as np
import torch

import cusdpa
from cusdpa.backends.flash import decode
from cusdpa.errors import ArgumentError
from cusdpa.kv_cache import flash_decode_plan

from . import arguments, bridge


def kv_cache_attention(query, k_cache, v_cache, cache_seqlens=None, key=None, value=None, *, block_table=None,
                       cache_batch_idx=None, is_causal=False, scale=None, window=None, softcap=0.0,
                       alibi_slopes=None, return_lse=False):
    """Write ``key``/``value`` (B, Lnew, Hkv, E/Ev) into ``k_cache``/``v_cache`` at ``cache_seqlens`` in place,
    then attend with ``query`` (B, Lq, Hq, E) over each sequence's first ``cache_seqlens + Lnew`` positions,
    causal and window aligned bottom-right; contiguous caches (B_cache, S_max, Hkv, E) with
    ``cache_batch_idx``, or paged ones (num_blocks, block_size, Hkv, E) with ``block_table`` (B, blocks).
    Returns out (B, Lq, Hq, Ev), or (out, lse (B, Hq, Lq)) with ``return_lse``; neither carries a gradient."""
    if (key is None) != (value is None):
        raise ArgumentError("key and value go together: pass both new tensors or neither")
    if isinstance(query, torch.Tensor) and query.is_cuda:  # first: a decode step's host time is the point
        done = _decode(query, k_cache, v_cache, cache_seqlens, key, value, block_table, cache_batch_idx, is_causal,
                       scale, window, softcap, alibi_slopes)
        if done is not None:
            return done if return_lse else done[0]
    _check(query, k_cache, v_cache, key, value, alibi_slopes)

    def view(x):
        return bridge.as_array(x) if isinstance(x, torch.Tensor) else x

    with bridge.on_stream(query.device):
        out, lse = cusdpa.kv_cache_attention(*map(view, (query, k_cache, v_cache, cache_seqlens, key, value)),
                                             block_table=view(block_table), cache_batch_idx=view(cache_batch_idx),
                                             is_causal=is_causal, scale=scale, window=window, softcap=softcap,
                                             alibi_slopes=view(alibi_slopes), return_lse=True)
        out, lse = _tensor(out, query.dtype), _tensor(lse, torch.float32)
    return (out, lse) if return_lse else out


def _tensor(array, dtype: torch.dtype) -> torch.Tensor:
    """A NumPy or CuPy result as a torch tensor, no copy (bf16 crosses as its bits)."""
    bits = array.view(np.int16) if dtype == torch.bfloat16 else array
    t = torch.from_numpy(bits) if isinstance(bits, np.ndarray) else torch.from_dlpack(bits)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def _check(query, k_cache, v_cache, key, value, alibi_slopes) -> None:
    """Errors in torch's terms (types, devices, dtypes): ``arguments.check_tensors``."""
    tensors = {"query": query, "k_cache": k_cache, "v_cache": v_cache}
    if key is not None:
        tensors.update(key=key, value=value)
    arguments.check_tensors(tensors, alibi_slopes=alibi_slopes)


# ---- the decode kernels' plans ------------------------------------------------------------------------

_plans: dict = {}  # signature -> DecodePlan, or None: the general path
_MISS = object()


def _int32_vector(t, device: int) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype == torch.int32 and t.is_contiguous() and t.get_device() == device


def _decode(query, k_cache, v_cache, cache_seqlens, key, value, block_table, cache_batch_idx, is_causal, scale,
            window, softcap, alibi_slopes):
    """(out, lse) through a cached decode plan, or None: the general path. Lengths, block table and batch rows
    as contiguous int32 CUDA tensors are read by the kernels only (not checked, as FlashAttention does not);
    an int or None as the length of every sequence is checked against the capacity. The signature holds every
    tensor's dtype and device, so ``_check`` runs once per signature, when its plan is made."""
    if not all(isinstance(t, torch.Tensor) for t in (k_cache, v_cache) + (() if key is None else (key, value))):
        return None
    device = query.get_device()
    seqlens_kind = type(cache_seqlens)
    if not (cache_seqlens is None or seqlens_kind is int or _int32_vector(cache_seqlens, device)):
        return None
    for t in (block_table, cache_batch_idx):
        if t is not None and not _int32_vector(t, device):
            return None
    if alibi_slopes is not None and not (isinstance(alibi_slopes, torch.Tensor) and alibi_slopes.is_contiguous()):
        return None
    # Written out, not a loop over the nine tensors (a decode step's host time: 4.1 -> 1.9 us on the CPU
    # machine). The int32 vectors were checked contiguous on the device above: their shapes say the rest.
    new = None if key is None else (key.shape, key.stride(), key.dtype, key.get_device(), value.shape, value.stride(),
                                    value.dtype, value.get_device())
    vectors = (None if block_table is None else block_table.shape,
               None if cache_batch_idx is None else cache_batch_idx.shape,
               None if cache_seqlens is None or seqlens_kind is int else cache_seqlens.shape)
    slopes = None if alibi_slopes is None else (alibi_slopes.shape, alibi_slopes.dtype, alibi_slopes.get_device())
    aligned = (query.data_ptr() | k_cache.data_ptr() | v_cache.data_ptr()
               | (0 if key is None else key.data_ptr() | value.data_ptr())) % 16 == 0
    signature = (query.shape, query.stride(), query.dtype, device, k_cache.shape, k_cache.stride(), k_cache.dtype,
                 k_cache.get_device(), v_cache.shape, v_cache.stride(), v_cache.dtype, v_cache.get_device(), new,
                 vectors, slopes, aligned, seqlens_kind, type(is_causal), is_causal, type(scale), scale,
                 window if window is None else tuple(window), type(softcap), softcap)
    plan = _plans.get(signature, _MISS)
    if plan is _MISS:
        _check(query, k_cache, v_cache, key, value, alibi_slopes)
        with bridge.on_stream(query.device):
            def view(x):
                return bridge.as_array(x) if isinstance(x, torch.Tensor) else x

            plan = flash_decode_plan(
                *map(view, (query, k_cache, v_cache, key, value)), None if block_table is None else block_table.shape,
                block_table is not None, cache_batch_idx is not None, isinstance(cache_seqlens, torch.Tensor),
                is_causal, scale, window, softcap, view(alibi_slopes))
        if len(_plans) >= 1024:
            _plans.clear()
        _plans[signature] = plan
    if plan is None:
        return None
    fixed_len = 0
    if not isinstance(cache_seqlens, torch.Tensor):
        fixed_len = plan.capacity - plan.new if cache_seqlens is None else cache_seqlens
        if fixed_len < 0 or fixed_len + plan.new > plan.capacity:
            raise ArgumentError(f"cache_seqlens + new tokens ({plan.new}) must lie in [0, {plan.capacity}] (the "
                                "cache's capacity per sequence)")
    slopes = 0
    if alibi_slopes is not None:
        B, hq = plan.lse_shape[:2]
        if alibi_slopes.shape != (B, hq):  # (Hq,): one row per sequence (the plan checked the shape)
            alibi_slopes = alibi_slopes.expand(B, hq).contiguous()
        slopes = alibi_slopes.data_ptr()
    out_strides, lse_strides = plan.strides
    out = query.new_empty_strided(plan.out_shape, out_strides)
    lse = query.new_empty_strided(plan.lse_shape, lse_strides, dtype=torch.float32)
    stream = torch._C._cuda_getCurrentRawStream(device)
    part, arrivals = _workspace(query, plan, device, stream) if plan.part_floats else (0, 0)

    def ptr(t):
        return 0 if t is None else t.data_ptr()

    plan.run(stream, query.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
             ptr(block_table if block_table is not None else cache_batch_idx),
             ptr(cache_seqlens if isinstance(cache_seqlens, torch.Tensor) else None), slopes, ptr(key), ptr(value),
             fixed_len, out.data_ptr(), lse.data_ptr(), part, arrivals)
    return out, lse


# (device, stream) -> [the splits' float32 workspace, their int32 arrival counts], kept from call to call
# (decode.KEEP_WORKSPACE). On one stream the calls' kernels run in order, so one workspace serves them all;
# the counts start zeroed and every launch leaves them so. A larger call replaces a buffer: the stream's
# earlier kernels still hold the old memory, which torch's allocator gives out again only after them, to
# work on the same stream. Not while a CUDA graph is captured: a graph's buffers come from its own pool.
_kept: dict = {}
MAX_KEPT_FLOATS = 1 << 24  # 64 MiB of workspace at most is kept per stream; a larger call allocates its own
MAX_KEPT_STREAMS = 16


def _workspace(query, plan, device: int, stream: int) -> tuple[int, int]:
    """(workspace, arrival counts) addresses for ``plan``'s split launches: kept buffers, or a fresh workspace
    that holds the counts too (0: the plan's launches zero them)."""
    floats = plan.part_floats + plan.ml_floats
    if (not decode.KEEP_WORKSPACE or floats > MAX_KEPT_FLOATS or torch._C._cuda_getDevice() != device
            or torch._C._cuda_isCurrentStreamCapturing()):  # (the capture check reads the current device's stream)
        return query.new_empty_strided((plan.workspace_floats,), (1,), dtype=torch.float32).data_ptr(), 0
    kept = _kept.get((device, stream))
    if kept is None:
        if len(_kept) >= MAX_KEPT_STREAMS:  # (a buffer goes back to torch's allocator for its own stream only)
            _kept.clear()
        kept = _kept[(device, stream)] = [query.new_empty(0, dtype=torch.float32),
                                          query.new_zeros(0, dtype=torch.int32)]
    if kept[0].numel() < floats:
        kept[0] = query.new_empty(floats, dtype=torch.float32)
    if kept[1].numel() < plan.arrival_words:
        kept[1] = query.new_zeros(plan.arrival_words, dtype=torch.int32)
    return kept[0].data_ptr(), kept[1].data_ptr()
