"""``kv_cache_attention`` on torch tensors: ``cusdpa.kv_cache_attention``'s semantics and layouts (see
cusdpa/kv_cache.py). CUDA calls that keep no gradient run it on CuPy views of the tensors (the split-KV
kernels, cache written and read in place); others write the cache with torch's indexing and attend through
the variable-length op (with autograd). The plan reads the sequence lengths and block table on the host,
so a call waits for them (no CUDA-graph capture yet)."""
from __future__ import annotations

import numpy as np
import torch

from cusdpa import kv_cache
from cusdpa.errors import ArgumentError

from . import arguments, bridge
from .functional import varlen_attention


def kv_cache_attention(query, k_cache, v_cache, cache_seqlens=None, key=None, value=None, *, block_table=None,
                       cache_batch_idx=None, is_causal=False, scale=None, window=None, softcap=0.0,
                       alibi_slopes=None, return_lse=False, backend=None):
    """Write ``key``/``value`` (B, Lnew, Hkv, E/Ev) into ``k_cache``/``v_cache`` at ``cache_seqlens`` in place,
    then attend with ``query`` (B, Lq, Hq, E) over each sequence's first ``cache_seqlens + Lnew`` positions,
    causal and window aligned bottom-right; contiguous caches (B_cache, S_max, Hkv, E) with
    ``cache_batch_idx``, or paged ones (num_blocks, block_size, Hkv, E) with ``block_table`` (B, blocks).
    Returns out (B, Lq, Hq, Ev), or (out, lse (B, Hq, Lq)) with ``return_lse``. No gradient flows into the
    cache."""
    tensors = {"query": query, "k_cache": k_cache, "v_cache": v_cache}
    if (key is None) != (value is None):
        raise ArgumentError("key and value go together: pass both new tensors or neither")
    if key is not None:
        tensors.update(key=key, value=value)
    arguments.check_tensors(tensors, alibi_slopes=alibi_slopes)
    if query.is_cuda and not (torch.is_grad_enabled() and query.requires_grad):
        return _on_arrays(query, k_cache, v_cache, cache_seqlens, key, value, block_table, cache_batch_idx,
                          is_causal, scale, window, softcap, alibi_slopes, return_lse)
    pl = kv_cache.plan(query.shape, k_cache.shape, v_cache.shape, None if key is None else key.shape, cache_seqlens,
                       block_table, cache_batch_idx)
    device = query.device

    def index(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a, device=device)

    if key is not None:
        if value.shape[:3] != key.shape[:3] or value.shape[3] != v_cache.shape[3]:
            raise ArgumentError(f"value.shape={tuple(value.shape)} must be key's but in the head dim "
                                    f"Ev={v_cache.shape[3]}")
        rows, slots = index(pl.write_rows), index(pl.write_slots)
        with torch.no_grad():
            k_cache[rows, slots] = key.reshape(-1, *key.shape[2:])
            v_cache[rows, slots] = value.reshape(-1, *value.shape[2:])
    B, Lq, hq, _ = query.shape
    rows, slots = index(pl.read_rows), index(pl.read_slots)
    out, lse = varlen_attention(query.reshape(B * Lq, *query.shape[2:]), k_cache[rows, slots].detach(),
                                v_cache[rows, slots].detach(), index(np.arange(B + 1, dtype=np.int32) * Lq),
                                index(pl.cu_seqlens_k), Lq, pl.max_seqlen_k, is_causal=is_causal, scale=scale,
                                enable_gqa=hq != k_cache.shape[2], causal_variant="lower_right", window=window,
                                softcap=softcap, alibi_slopes=alibi_slopes, return_lse=True, backend=backend)
    out = out.reshape(B, Lq, *out.shape[1:])
    return (out, lse.reshape(hq, B, Lq).transpose(0, 1)) if return_lse else out


def _on_arrays(query, k_cache, v_cache, cache_seqlens, key, value, block_table, cache_batch_idx, is_causal, scale,
               window, softcap, alibi_slopes, return_lse):
    """A CUDA call with no gradient to keep: ``cusdpa.kv_cache_attention`` on CuPy views of the tensors (the
    split-KV kernels, the cache written and read in place), on torch's current stream."""
    import cusdpa

    def view(x):
        return bridge.as_array(x) if isinstance(x, torch.Tensor) else x

    with bridge.on_stream(query.device):
        out, lse = cusdpa.kv_cache_attention(*map(view, (query, k_cache, v_cache, cache_seqlens, key, value)),
                                             block_table=view(block_table), cache_batch_idx=view(cache_batch_idx),
                                             is_causal=is_causal, scale=scale, window=window, softcap=softcap,
                                             alibi_slopes=view(alibi_slopes), return_lse=True)
        out = _tensor(out, query.dtype)
        lse = _tensor(lse, torch.float32)
    return (out, lse) if return_lse else out


def _tensor(array, dtype: torch.dtype) -> torch.Tensor:
    """A CuPy result as a torch tensor, no copy (bf16 crosses DLPack as its bits)."""
    if dtype == torch.bfloat16:
        return torch.from_dlpack(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_dlpack(array)
