"""PyTorch bridge for cusdpa: zero-copy custom ops with autograd and torch.compile support, nn modules,
and an override that routes torch.nn.functional.scaled_dot_product_attention to cusdpa.

    import interop
    out = interop.scaled_dot_product_attention(q, k, v, is_causal=True)   # torch tensors, autograd
    attn = interop.CausalSelfAttention(num_heads=8, embed_dimension=512, is_causal=True)
    with interop.sdpa_override():                                          # unchanged models
        y = model(x)                                                       # F.scaled_dot_product_attention -> cusdpa

Importing it registers the ``cusdpa::*`` torch.library ops (it imports torch; cusdpa itself does not).
"""
from .functional import scaled_dot_product_attention, varlen_attention
from .kv_cache import kv_cache_attention
from .ring import ring_attention
from .modules import CausalSelfAttention
from .override import disable_sdpa_override, enable_sdpa_override, sdpa_override

__all__ = ["scaled_dot_product_attention", "varlen_attention", "kv_cache_attention", "ring_attention",
           "CausalSelfAttention", "sdpa_override", "enable_sdpa_override",
           "disable_sdpa_override"]
