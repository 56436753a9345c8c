"""``kv_cache_attention`` on torch tensors: ``cusdpa.kv_cache_attention`` (its semantics, layouts and
kernels: cusdpa/kv_cache.py) on zero-copy array views of the tensors, the cache written in place, on
torch's current stream. Inference only, as FlashAttention's ``flash_attn_with_kvcache``: no gradient
flows. The plan reads the sequence lengths and block table on the host, so a call waits for them (no
CUDA-graph capture yet)."""
from __future__ import annotations

import numpy as np
import torch

import cusdpa
from cusdpa.errors import ArgumentError

from . import arguments, bridge


def kv_cache_attention(query, k_cache, v_cache, cache_seqlens=None, key=None, value=None, *, block_table=None,
                       cache_batch_idx=None, is_causal=False, scale=None, window=None, softcap=0.0,
                       alibi_slopes=None, return_lse=False):
    """Write ``key``/``value`` (B, Lnew, Hkv, E/Ev) into ``k_cache``/``v_cache`` at ``cache_seqlens`` in place,
    then attend with ``query`` (B, Lq, Hq, E) over each sequence's first ``cache_seqlens + Lnew`` positions,
    causal and window aligned bottom-right; contiguous caches (B_cache, S_max, Hkv, E) with
    ``cache_batch_idx``, or paged ones (num_blocks, block_size, Hkv, E) with ``block_table`` (B, blocks).
    Returns out (B, Lq, Hq, Ev), or (out, lse (B, Hq, Lq)) with ``return_lse``; neither carries a gradient."""
    tensors = {"query": query, "k_cache": k_cache, "v_cache": v_cache}
    if (key is None) != (value is None):
        raise ArgumentError("key and value go together: pass both new tensors or neither")
    if key is not None:
        tensors.update(key=key, value=value)
    arguments.check_tensors(tensors, alibi_slopes=alibi_slopes)

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
