"""BlockMask: an attn_mask built once and passed to many calls, which keeps the block summary FLASH makes of it.

Before a masked call, FLASH's Hopper kernels need one pass over the whole mask on the GPU
(kernels_cuda/mask_summary.cu): which keys some query attends, and per tile whether none, some or every
pair is attended, so that key blocks the mask hides entirely are skipped and fully attended ones read no
mask. The pass reads every byte of the mask (64 us for a bool (4, 1, 4096, 4096) mask on the H200), which a
mostly empty mask would otherwise pay on every call, however few blocks it lets through. Torch callers
get the summary kept for them (interop keys it on the mask's storage and version counter); a CuPy array
has no version counter, so CuPy callers say so themselves by wrapping the mask:

    mask = cusdpa.BlockMask(document_mask)        # once
    out = cusdpa.scaled_dot_product_attention(q, k, v, mask)   # every call: the summary made once

The wrapped array must not change while the BlockMask is in use (wrap it again after changing it). Every
entry point that takes ``attn_mask`` takes a BlockMask, and every backend reads its array as it would read
the array itself.
"""
from __future__ import annotations


class BlockMask:
    """``mask`` (bool or float, as ``attn_mask`` takes it) with the summaries FLASH made of it, one per tile
    geometry and stream (``summaries``: filled by the backend, opaque to callers)."""

    __slots__ = ("mask", "summaries")

    def __init__(self, mask):
        if isinstance(mask, BlockMask):
            mask = mask.mask
        if not (hasattr(mask, "shape") and hasattr(mask, "dtype")):
            from .errors import ArgumentTypeError

            raise ArgumentTypeError(f"BlockMask takes an array (bool or float attn_mask), got {type(mask).__name__}")
        self.mask = mask
        self.summaries: dict = {}

    @property
    def shape(self) -> tuple:
        return tuple(self.mask.shape)

    @property
    def dtype(self):
        return self.mask.dtype

    def __repr__(self) -> str:
        return f"BlockMask(shape={self.shape}, dtype={self.dtype}, summaries={len(self.summaries)})"
