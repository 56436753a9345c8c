"""nn.Modules with cusdpa attention."""
from __future__ import annotations

import torch
from torch import nn

from .functional import scaled_dot_product_attention


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention of the PyTorch SDPA tutorial, attending with cusdpa.

    Input (B, L, embed_dimension), dense or a jagged nested tensor (B, j, embed_dimension); output of
    the same shape. One fused projection makes query, key and value; ``dropout`` applies to the
    attention probabilities and to the output projection, in training mode only. ``is_causal`` holds
    in both modes (the tutorial drops it in eval mode, which would let a token see its future).

    ``attention="torch"`` calls ``torch.nn.functional.scaled_dot_product_attention`` instead, looked
    up at each call (so ``interop.sdpa_override`` reaches it): the same model for comparisons.
    ``backend`` restricts the cusdpa backends, as in ``interop.scaled_dot_product_attention``.
    """

    def __init__(self, num_heads: int, embed_dimension: int, bias: bool = False, is_causal: bool = False,
                 dropout: float = 0.0, *, attention: str = "cusdpa", backend=None):
        super().__init__()
        if embed_dimension % num_heads:
            raise ValueError(f"embed_dimension={embed_dimension} must be a multiple of num_heads={num_heads}")
        if attention not in ("cusdpa", "torch"):
            raise ValueError(f"attention={attention!r} must be 'cusdpa' or 'torch'")
        self.c_attn = nn.Linear(embed_dimension, 3 * embed_dimension, bias=bias)
        self.c_proj = nn.Linear(embed_dimension, embed_dimension, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        self.num_heads = num_heads
        self.embed_dimension = embed_dimension
        self.is_causal = is_causal
        self.dropout = dropout
        self.attention = attention
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.size(0)
        head_dim = self.embed_dimension // self.num_heads
        # (B, L, 3D) -> three (B, H, L, head_dim) views; the last dim stays contiguous, so no copy.
        q, k, v = (t.view(batch, -1, self.num_heads, head_dim).transpose(1, 2)
                   for t in self.c_attn(x).chunk(3, -1))
        dropout_p = self.dropout if self.training else 0.0
        if self.attention == "torch":
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=self.is_causal)
        else:
            y = scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=self.is_causal,
                                             backend=self.backend)
        y = y.transpose(1, 2).reshape(batch, -1, self.embed_dimension)
        return self.resid_dropout(self.c_proj(y))

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, is_causal={self.is_causal}, dropout={self.dropout}, "
                f"attention={self.attention!r}")
