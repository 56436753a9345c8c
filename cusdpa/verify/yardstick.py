"""The yardstick of the error rule (judge.py): attention computed by PyTorch at the problem's own precision.

``same_precision(pr, dout)`` takes any validated Problem (dense or varlen; bool or float masks of any
broadcast shape and float dtype; causal in either alignment; windows; GQA; dropout; rank-2 and
broadcast batch inputs; empty sizes) on NumPy or CuPy arrays and runs it in torch on the same device
(CPU torch for NumPy, CUDA torch for CuPy). It computes the FlashAttention recipe in torch ops, the
numerics of a careful fused kernel, so that a backend is held to what its precision allows:

  s = scale * q k^T from the low-precision inputs, accumulated in fp32 (fp64 for fp64 inputs),
      soft-capped (softcap * tanh(s / softcap)) if asked, ALiBi's bias (-slope * |i + S - L - j|) if given,
      plus a float mask converted to that precision;
  causal, window and a bool mask as -inf; softmax in fp32; P = 0 on rows that see no key;
  dropout: P * keep / (1 - p), keep the exact mask of cusdpa.philox (seed, offset, flat batch-head);
  P rounded to the input dtype before P @ V, the output in the input dtype; lse = logsumexp(s) in fp32;
  fp32 matmuls on TF32 where the problem allows it (Options.allow_tf32), exact fp32 otherwise.

Gradients are torch autograd through those ops: dP, dq, dk and dv are rounded to the input dtype where
autograd rounds them, and GQA's key/value heads are repeated in the input dtype, so dk and dv sum
their group's rounded gradients. A float mask's gradient is dS summed over its broadcast dims in fp32,
then rounded to the mask's dtype; gradients of batch-broadcast inputs likewise. Not torch's fused SDPA:
its kernel (and so its error) changes with the device, dtype and version, and it has no windows, no
varlen with every option and not the Philox keep-mask; the recipe is one fixed computation everywhere.

The work goes in the reference's chunks (whole GQA groups of heads of one batch element), so the
scores of a long sequence never exist for all heads at once. NaN/inf stored where no query may look
(padding) is zeroed first: torch's 0 * NaN would make the yardstick's error infinite and the
judgement vacuous.
"""
from __future__ import annotations

import contextlib

import numpy as np

from .. import philox, problem, reference


def same_precision(pr: problem.Problem, dout=None):
    """(out, lse, grads) of PyTorch at ``pr``'s precision as float64 arrays of ``pr.xp``, shaped like the
    backends' results; grads = (dq, dk, dv[, dmask for a float mask]) for the output gradient ``dout``
    (an array of ``pr.xp`` shaped like out), () without it."""
    import torch

    device = torch.device(pr.device)
    dout_t = None if dout is None else as_tensor(dout, device)
    with _matmul_precision(torch, "tf32" if pr.allow_tf32 and pr.dtype_name == "float32" else None):
        if pr.varlen is None:
            full = pr.batch_shape + (pr.hq, pr.L, pr.Ev)
            out, lse, grads = _dense(torch, pr, None if dout_t is None else dout_t.reshape(full), 0)
        else:
            out, lse, grads = _varlen(torch, pr, dout_t)
    return (as_float64(out.reshape(pr.out_shape)), as_float64(lse.reshape(pr.lse_shape)),
            tuple(as_float64(g) for g in grads))


@contextlib.contextmanager
def _matmul_precision(torch, precision):
    """torch's fp32 matmuls on CUDA at ``precision`` ("tf32": a problem that allows TF32 is held to what TF32
    products give) for the body; None leaves them as they are."""
    if precision is None:
        yield
        return
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = precision
    try:
        yield
    finally:
        matmul.fp32_precision = before


def as_float64(t):
    """A torch tensor's values as a float64 NumPy (CPU) or CuPy (CUDA) array."""
    t = t.detach().double().contiguous()
    if t.device.type == "cpu":
        return t.numpy()
    import cupy

    return cupy.from_dlpack(t)


def as_tensor(x, device):
    """A copy of a NumPy/CuPy array as a torch tensor on ``device``, same dtype; bf16 (which DLPack and
    NumPy do not share with torch) and bool travel as their bits."""
    import torch

    xp = problem.array_module(x, "array")
    bits = {"bfloat16": ("int16", torch.bfloat16), "bool": ("uint8", torch.bool)}.get(x.dtype.name)
    raw = xp.array(x.view(bits[0]) if bits else x, order="C")
    t = torch.from_numpy(raw) if xp is np else torch.from_dlpack(raw)
    return (t.view(bits[1]) if bits else t).to(device)


def _dense(torch, pr: problem.Problem, dout, bh_base: int):
    """Torch tensors out (*batch, Hq, L, Ev), lse (*batch, Hq, L) and, given ``dout`` of out's shape, the
    gradients in the inputs' shapes and dtypes. ``bh_base``: the dropout counter's first batch-head."""
    device, dt = torch.device(pr.device), getattr(torch, pr.dtype_name)
    acc = torch.float64 if dt == torch.float64 else torch.float32
    full, g = pr.batch_shape, pr.group
    inputs = [torch.nan_to_num(as_tensor(x, device), 0.0, 0.0, 0.0) for x in (pr.q3, pr.k3, pr.v3)]
    q, k, v = (x.expand(full + x.shape[-3:]) for x in inputs)
    mask = None
    if pr.mask is not None:
        inputs.append(as_tensor(pr.mask, device))
        mask = inputs[-1].expand(full + (pr.hq, pr.L, pr.S))
    float_mask = pr.mask_kind == "float"
    allowed = reference.structural_mask(pr.L, pr.S, pr.causal, pr.lower_right, pr.window)
    allowed = None if allowed is None else torch.as_tensor(allowed, device=device)
    slopes = None
    if pr.alibi_slopes is not None:  # as the reference adds it: after the cap, before a float mask
        slopes = as_tensor(pr.alibi_slopes, device).to(acc).expand(full + (pr.hq,))
        rows, keys = torch.arange(pr.L, device=device), torch.arange(pr.S, device=device)
        distance = (rows[:, None] + (pr.S - pr.L) - keys[None, :]).abs().to(acc)

    out = torch.zeros(full + (pr.hq, pr.L, pr.Ev), dtype=dt, device=device)
    lse = torch.full(full + (pr.hq, pr.L), -torch.inf, dtype=torch.float32, device=device)
    # gradients of the batch-expanded inputs, summed to the inputs' shapes (and rounded) at the end
    expanded = [q, k, v] + ([mask] if float_mask else [])
    sums = [torch.zeros(x.shape, dtype=acc, device=device) for x in expanded] if dout is not None else []
    for b, flat, h0, h1 in reference.chunks(pr) if pr.L and pr.S else ():
        kv = slice(h0 // g, h1 // g)
        parts = [q[b][h0:h1], k[b][kv], v[b][kv]] + ([mask[b][h0:h1].to(acc)] if float_mask else [])
        leaves = [x.detach().requires_grad_(dout is not None) for x in parts]
        qc, kc, vc = leaves[:3]
        s = (qc.to(acc) @ kc.repeat_interleave(g, 0).to(acc).transpose(-1, -2)) * pr.scale
        if pr.softcap:
            s = pr.softcap * torch.tanh(s / pr.softcap)
        if slopes is not None:
            s = s - slopes[b][h0:h1, None, None] * distance
        if float_mask:
            s = s + leaves[3]
        visible = allowed
        if pr.mask_kind == "bool":
            visible = mask[b][h0:h1] if visible is None else visible & mask[b][h0:h1]
        if visible is not None:
            s = torch.where(visible, s, -torch.inf)
        row_any = (s > -torch.inf).any(-1, keepdim=True)
        # rows that see nothing get finite scores and then P = 0, so no NaN enters the backward
        P = torch.where(row_any, torch.softmax(torch.where(row_any, s, 0.0), -1), 0.0)
        if pr.dropout_p > 0:
            bh = np.arange(bh_base + flat * pr.hq + h0, bh_base + flat * pr.hq + h1)
            keep = philox.keep_mask(pr.seed, pr.offset, bh, pr.L, pr.S, pr.dropout_p, pr.xp)
            P = P * as_tensor(keep, device) * pr.dropout_rescale
        o = P.to(dt) @ vc.repeat_interleave(g, 0)
        out[b][h0:h1] = o.detach()
        lse[b][h0:h1] = torch.logsumexp(s.detach(), -1)
        if dout is not None:
            for total, rows, grad in zip(sums, (slice(h0, h1), kv, kv, slice(h0, h1)),
                                         torch.autograd.grad(o, leaves, dout[b][h0:h1].to(dt))):
                total[b][rows] = grad
    grads = [total.sum_to_size(x.shape).to(x.dtype).reshape(given.shape)
             for total, x, given in zip(sums, inputs, (pr.q, pr.k, pr.v, pr.mask))]
    return out, lse, grads


def _varlen(torch, pr: problem.Problem, dout):
    """_dense's results for a packed problem, sequence by sequence."""
    device, dt = torch.device(pr.device), getattr(torch, pr.dtype_name)
    out = torch.zeros(pr.out_shape, dtype=dt, device=device)
    lse = torch.full(pr.lse_shape, -torch.inf, dtype=torch.float32, device=device)
    grads = [torch.zeros(x.shape, dtype=dt, device=device) for x in (pr.q, pr.k, pr.v)] if dout is not None else []
    for b, sub, qr, kr in reference.varlen_pieces(pr):
        o, l, gs = _dense(torch, sub, None if dout is None else dout[qr].transpose(0, 1), b * pr.hq)
        out[qr], lse[:, qr] = o.transpose(0, 1), l
        for total, rows, grad in zip(grads, (qr, kr, kr), gs):
            total[rows] = grad.transpose(0, 1)
    return out, lse, grads
