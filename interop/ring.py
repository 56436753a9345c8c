"""Ring attention (context parallelism) through torch.distributed: each rank of a process group holds one
chunk of the sequence of q, k and v and gets its chunk of the output; key/value chunks travel around the
ring, each rank attending to the chunk in hand while the next one is on its way.

Layouts. ``"contiguous"``: rank r holds positions [r C, (r + 1) C) of the sequence (C = L / W, W ranks).
``"zigzag"``: the sequence is cut in 2W chunks of C / 2 and rank r holds chunks r and 2W - 1 - r, in that
order: under a causal mask every rank then has the same work (a contiguous layout gives rank W - 1 all of
it and rank 0 one chunk's). Every rank's q, k and v have the same layout and length.

Forward: at step s, rank r holds the key/value chunk of rank (r - s) mod W. Each piece of its queries (one
contiguous piece, or a zigzag rank's two halves) against each piece of those keys attends by the
visibility of their global positions (causal, window): not at all, without a mask, causally (the same
positions), or with a bool mask; pieces keep causal ring steps mask-free. Each pair's (out, lse) merges
exactly into the running result through the lse: lse = logaddexp(lse_a, lse_b), out = out_a exp(lse_a -
lse) + out_b exp(lse_b - lse).

Backward: the chunk steps again in the same order, each taking the attention backward op with the merged
out and lse (its probabilities are then the global ones, P = exp(s - lse)), so the step's dq, dk and dv are
exact parts of the gradients; dq stays, and dk, dv accumulate as they travel with their k and v chunk,
which reaches its owner after W sends.

Every backend's backward takes the out and lse it is given (docs/DESIGN.md), so each runs the steps: on CUDA
tensors (NCCL) FLASH, EFFICIENT (fp32, head dims FLASH does not take) or MATH, as dispatch chooses; on CPU
tensors (gloo) the NumPy reference through the same ops, or EFFICIENT on Numba's CUDA simulator.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from cusdpa.errors import ArgumentError

from . import arguments, ops

LAYOUTS = ("contiguous", "zigzag")


def segments(rank: int, world: int, length: int, layout: str) -> list[tuple[int, int, int]]:
    """(local start, global start, length) of each contiguous piece of ``rank``'s ``length`` tokens."""
    if layout == "contiguous":
        return [(0, rank * length, length)]
    half = length // 2
    return [(0, rank * half, half), (half, (2 * world - 1 - rank) * half, half)]


def positions(rank: int, world: int, length: int, layout: str) -> torch.Tensor:
    """Global sequence positions of the ``length`` local tokens of ``rank``."""
    return torch.cat([torch.arange(g, g + n) for _, g, n in segments(rank, world, length, layout)])


def _visible(q_pos, k_pos, is_causal: bool, window) -> torch.Tensor:
    """(Lq, Lk) bool: query at q_pos[i] sees key at k_pos[j] (causal, window aligned on the diagonal)."""
    d = k_pos[None, :] - q_pos[:, None]
    seen = torch.ones(d.shape, dtype=torch.bool)
    if is_causal:
        seen &= d <= 0
    if window is not None:
        left, right = window
        if left >= 0:
            seen &= d >= -left
        if right >= 0:
            seen &= d <= right
    return seen


class _Pair:
    """One query piece against one key piece of a step: their local slices, and how they attend: plainly,
    causally (the same positions), or through a bool mask; pairs that see nothing are not made. Pieces
    keep most pairs mask-free (a zigzag rank's two halves against another rank's are each all or nothing)."""

    def __init__(self, qs: slice, ks: slice, causal: bool = False, mask=None):
        self.qs, self.ks, self.causal, self.mask = qs, ks, causal, mask


MAX_MASK = 1 << 26  # elements of a pair's mask: a window's edge between pieces longer than this is refused


def _pair(q_piece, k_piece, is_causal: bool, window, device) -> _Pair | None:
    """The _Pair of query piece (local start, global start, length) against key piece, decided from the
    range of key - query offsets d the pieces span: none visible, all (no mask), the causal diagonal, or a
    mask (only where a window's edge or a causal band crosses pieces that are not the same positions)."""
    (ql, qg, qn), (kl, kg, kn) = q_piece, k_piece
    lo, hi = -math.inf, math.inf  # the visible offsets d = key - query
    if is_causal:
        hi = 0
    if window is not None:
        if window[0] >= 0:
            lo = max(lo, -window[0])
        if window[1] >= 0:
            hi = min(hi, window[1])
    d_min, d_max = kg - (qg + qn - 1), (kg + kn - 1) - qg
    qs, ks = slice(ql, ql + qn), slice(kl, kl + kn)
    if d_max < lo or d_min > hi:
        return None
    if lo <= d_min and d_max <= hi:
        return _Pair(qs, ks)
    if qg == kg and qn == kn and hi == 0 and lo <= d_min:
        return _Pair(qs, ks, causal=True)
    if qn * kn > MAX_MASK:
        raise ArgumentError(f"a window edge between chunks of {qn} and {kn} tokens would need a {qn} x {kn} mask; "
                            "use shorter chunks per rank for windowed ring attention")
    seen = _visible(torch.arange(qg, qg + qn), torch.arange(kg, kg + kn), is_causal, window)
    return _Pair(qs, ks, mask=seen.to(device))


def _pairs(q_segments, k_segments, is_causal: bool, window, device) -> tuple:
    return tuple(p for qp in q_segments for kp in k_segments
                 if (p := _pair(qp, kp, is_causal, window, device)) is not None)


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    """Partial outputs and gradients add up in fp32, or in the inputs' dtype where that is wider."""
    return torch.promote_types(dtype, torch.float32)


def _merge(out, lse, step_out, step_lse) -> None:
    """Merge a partial attention over other keys into (out, lse) in place (lse (B, H, n), out (B, H, n, Ev))."""
    new = torch.logaddexp(lse, step_lse)
    safe = torch.where(torch.isinf(new), torch.zeros_like(new), new)  # rows that see nothing yet stay 0
    a, b = torch.exp(lse - safe), torch.exp(step_lse - safe)
    out.copy_(out * a[..., None] + step_out.to(out.dtype) * b[..., None])
    lse.copy_(new)


def _exchange(sends: list, recvs: list, group, rank: int, world: int) -> list:
    """Post sends of ``sends`` to the next rank and receives into ``recvs`` from the previous one; the
    works to wait for."""
    nxt, prv = dist.get_global_rank(group, (rank + 1) % world), dist.get_global_rank(group, (rank - 1) % world)
    ops_ = [dist.P2POp(dist.isend, t, nxt, group) for t in sends] + [dist.P2POp(dist.irecv, t, prv, group)
                                                                      for t in recvs]
    return dist.batch_isend_irecv(ops_)


class RingAttention(torch.autograd.Function):
    """Arguments: q, k, v, the group, per step the _Pairs of this rank, the option values, backends."""

    @staticmethod
    def forward(ctx, q, k, v, group, steps, values, backends):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        out = q.new_zeros(q.shape[:-1] + v.shape[-1:], dtype=_accumulation(q.dtype))
        lse = q.new_full(q.shape[:-1], -math.inf, dtype=torch.float32)
        k_cur, v_cur = k.contiguous(), v.contiguous()
        for s, pairs in enumerate(steps):
            if s + 1 < world:  # the next chunk travels while this one is attended to
                k_next, v_next = torch.empty_like(k_cur), torch.empty_like(v_cur)
                works = _exchange([k_cur, v_cur], [k_next, v_next], group, rank, world)
            for p in pairs:
                step_out, step_lse = ops.call(ops.sdpa_fwd, q[:, :, p.qs], k_cur[:, :, p.ks], v_cur[:, :, p.ks],
                                              p.mask, None, *_with_causal(values, p.causal), None, backends)
                _merge(out[:, :, p.qs], lse[:, :, p.qs], step_out, step_lse)
            if s + 1 < world:
                for w in works:
                    w.wait()
                k_cur, v_cur = k_next, v_next
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.steps, ctx.values, ctx.backends = group, steps, values, backends
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group = ctx.group
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        dout = dout.contiguous()
        acc = _accumulation(q.dtype)
        dq = torch.zeros_like(q, dtype=acc)
        k_cur, v_cur = k.contiguous(), v.contiguous()
        dk_cur, dv_cur = torch.zeros_like(k, dtype=acc), torch.zeros_like(v, dtype=acc)
        deterministic = torch.are_deterministic_algorithms_enabled()
        for s, pairs in enumerate(ctx.steps):
            if s + 1 < world:  # the next chunk travels while this one is differentiated
                k_next, v_next = torch.empty_like(k_cur), torch.empty_like(v_cur)
                works = _exchange([k_cur, v_cur], [k_next, v_next], group, rank, world)
            for p in pairs:
                gq, gk, gv, _ = ops.call(ops.sdpa_bwd, dout[:, :, p.qs], q[:, :, p.qs], k_cur[:, :, p.ks],
                                         v_cur[:, :, p.ks], p.mask, None, out[:, :, p.qs], lse[:, :, p.qs],
                                         *_with_causal(ctx.values, p.causal), None, ctx.backends, deterministic,
                                         False)
                dq[:, :, p.qs] += gq
                dk_cur[:, :, p.ks] += gk
                dv_cur[:, :, p.ks] += gv
            if world > 1:  # the chunk's gradients follow it; after W moves they are home
                dk_next, dv_next = torch.empty_like(dk_cur), torch.empty_like(dv_cur)
                for w in _exchange([dk_cur, dv_cur], [dk_next, dv_next], group, rank, world):
                    w.wait()
                dk_cur, dv_cur = dk_next, dv_next
            if s + 1 < world:
                for w in works:
                    w.wait()
                k_cur, v_cur = k_next, v_next
        return dq.to(q.dtype), dk_cur.to(k.dtype), dv_cur.to(v.dtype), None, None, None, None


def _with_causal(values: tuple, causal: bool) -> tuple:
    """The option values of a pair: the call's scale and GQA, causal for a pair of the same positions only
    (the window, and the causal band of other pairs, are in the pair's mask)."""
    dropout_p, _, scale, enable_gqa, _, _, softcap, allow_tf32 = values
    return arguments.options(dropout_p, causal, scale, enable_gqa, "upper_left", None, softcap, allow_tf32)


def ring_attention(query, key, value, *, group=None, is_causal=False, scale=None, enable_gqa=False, window=None,
                   layout="contiguous", backend=None):
    """This rank's chunk of attention over the sequence that the ranks of ``group`` (default: the world) hold
    in chunks (module docstring): query (B, Hq, L/W, E), key (B, Hkv, L/W, E), value (B, Hkv, L/W, Ev) of the
    same layout on every rank, returning (B, Hq, L/W, Ev), differentiable in query, key and value. Causal and
    ``window=(left, right)`` are over global positions (upper-left: query i sees key j <= i); ``backend`` as
    ``scaled_dot_product_attention``'s (None: the enabled backends). Every rank must call it with the same
    options and shapes."""
    if not dist.is_available() or not dist.is_initialized():
        raise ArgumentError("ring_attention needs an initialised torch.distributed process group")
    if layout not in LAYOUTS:
        raise ArgumentError(f"layout={layout!r} must be one of {LAYOUTS}")
    tensors = {"query": query, "key": key, "value": value}
    arguments.check_tensors(tensors)
    for name, t in tensors.items():
        if t.dim() != 4:
            raise ArgumentError(f"{name}.shape={tuple(t.shape)} must be (batch, heads, local length, head_dim)")
    length = query.shape[2]
    if key.shape[2] != length or value.shape[2] != length:
        raise ArgumentError(f"query, key and value must hold chunks of one length; got {query.shape[2]}, "
                            f"{key.shape[2]}, {value.shape[2]}")
    if layout == "zigzag" and length % 2:
        raise ArgumentError(f"layout='zigzag' needs an even local length (two half chunks), got {length}")
    group = group if group is not None else dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    values, backends = arguments.resolve(0.0, is_causal, scale, enable_gqa, "upper_left", window, 0.0, backend,
                                         arguments.tf32_allowed(query))
    window = None if values[5] is None else tuple(values[5])
    mine = segments(rank, world, length, layout)
    steps = tuple(_pairs(mine, segments((rank - s) % world, world, length, layout), values[1], window, query.device)
                  for s in range(world))
    return RingAttention.apply(query, key, value, group, steps, values, backends)
