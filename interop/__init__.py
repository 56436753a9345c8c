"""PyTorch bridge for cusdpa: zero-copy custom ops with autograd and torch.compile support, nn modules,
and an override that routes torch.nn.functional.scaled_dot_product_attention to cusdpa.

Importing it registers the ``cusdpa::*`` torch.library ops (it imports torch; cusdpa itself does not).
"""
from .functional import scaled_dot_product_attention
from .modules import CausalSelfAttention
from .override import disable_sdpa_override, enable_sdpa_override, sdpa_override

__all__ = ["scaled_dot_product_attention", "CausalSelfAttention", "sdpa_override", "enable_sdpa_override",
           "disable_sdpa_override"]
