"""The attn_mask summaries of the torch ops: made once per mask, reused while the mask is unchanged.

FLASH's Hopper kernels read a mask through its summary (``cusdpa.block_mask`` says what it holds and what
the pass that makes it costs), which a later call with the same unchanged mask need not make again: a
model that passes one document or padding mask to every layer pays for one pass. A summary is kept per
mask storage (weakly: it goes with the storage), per view of it (offset, shape, strides, dtype), per
summary of a plan (its tiles) and per stream (a summary made on another stream is not ordered before this
one's kernels), and stands while the storage's version counter, which every in-place change of the mask
or of a view of it through torch moves, stays where it was.

Only plain eager calls keep summaries (the ops' ``eager``). A compiled graph's generated code may write
another mask into a buffer it reuses, by its own kernels, which move no version counter; CUDA graph
captures must replay the pass; inference tensors have no version counter: those calls make their own
summary every time. Writes that bypass torch's version counter in eager code (through ``.data``, DLPack
or CuPy views, custom kernels) are not seen either: give such a mask as a new tensor after changing it.
"""
from __future__ import annotations

import weakref

import torch

MAX_MASKS = 16  # storages whose summaries are kept; past that the oldest goes
_held: dict = {}  # id(storage) -> [weak reference to it, its version, {key: (seen, blocks)}]


def buffers(query: torch.Tensor, attn_mask: torch.Tensor | None, plan, stream: int,
            keep: bool) -> tuple[int, int, int]:
    """The (mask, seen, blocks) addresses that ``plan``'s kernels take, zeros without a mask; the summary is
    made first, on ``stream``, unless a kept one serves (``keep``: a plain eager call may keep and reuse one)."""
    if attn_mask is None:
        return 0, 0, 0
    if plan.summary_key is None:  # no summary to make: EFFICIENT's kernels read the mask alone
        return attn_mask.data_ptr(), 0, 0
    seen, blocks = tensors(query, attn_mask, plan, stream, keep)
    return attn_mask.data_ptr(), seen.data_ptr(), blocks.data_ptr()


def tensors(query: torch.Tensor, attn_mask: torch.Tensor, plan, stream: int,
            keep: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The (seen, blocks) buffers of ``attn_mask``'s summary for ``plan`` (which has one), made on ``stream``
    unless a kept one serves; a kept pair stays alive while the mask's storage does and its version holds."""
    mask = attn_mask.data_ptr()
    if not keep or attn_mask.is_inference() or (query.is_cuda and torch._C._cuda_isCurrentStreamCapturing()):
        seen, blocks = _new(query, plan)
        plan.run_summary(stream, mask, seen.data_ptr(), blocks.data_ptr())
        return seen, blocks
    summaries = _summaries_of(attn_mask)
    key = (attn_mask.storage_offset(), attn_mask.shape, attn_mask.stride(), attn_mask.dtype, plan.summary_key, stream)
    held = summaries.get(key)
    if held is None:
        held = summaries[key] = _new(query, plan)
        plan.run_summary(stream, mask, held[0].data_ptr(), held[1].data_ptr())
    return held


def _new(query: torch.Tensor, plan) -> tuple[torch.Tensor, torch.Tensor]:
    return (query.new_empty(plan.seen_bytes, dtype=torch.uint8),
            query.new_empty(max(plan.blocks_bytes, 1), dtype=torch.int8))


def _summaries_of(attn_mask: torch.Tensor) -> dict:
    """The summaries kept for the mask's storage at its current version (emptied when the version moved)."""
    storage, version = attn_mask.untyped_storage(), attn_mask._version
    entry = _held.get(id(storage))
    if entry is None or entry[0]() is not storage:
        if len(_held) >= MAX_MASKS:
            del _held[next(iter(_held))]
        entry = _held[id(storage)] = [weakref.ref(storage, _forget(id(storage))), version, {}]
    elif entry[1] != version:
        entry[1] = version
        entry[2].clear()
    return entry[2]


def _forget(key: int):
    def drop(ref):
        entry = _held.get(key)
        if entry is not None and entry[0] is ref:  # not a later storage that took the same id
            del _held[key]

    return drop
