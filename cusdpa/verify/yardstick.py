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

TF32 is computed, not asked for: both operands of each product (forward and autograd's backward ones)
rounded to TF32 (10-bit mantissa, to nearest, ties away, as cvt.rna.tf32.f32 does), then multiplied in
exact fp32 (products of 11-bit significands are exact; fp32 sums). cuBLAS takes fp32_precision = "tf32" as
leave to use TF32, not an order (its heuristics may pick exact fp32 kernels for a shape): asking for it, the
yardstick of one TF32 problem on the H200 (L = 130, S = 70, E = 96, dropout, a bool mask) had fp32's error,
6e-7 on out, where TF32's is ~1e-3, and the TF32 kernels failed against it. The fp32 matmuls of the
yardstick otherwise run with fp32_precision = "ieee", whatever the process set.

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
    mm = _tf32_matmul(torch) if pr.allow_tf32 and pr.dtype_name == "float32" else torch.matmul
    with _exact_fp32_matmuls(torch):
        if pr.varlen is None:
            full = pr.batch_shape + (pr.hq, pr.L, pr.Ev)
            out, lse, grads = _dense(torch, pr, None if dout_t is None else dout_t.reshape(full), 0, mm)
        else:
            out, lse, grads = _varlen(torch, pr, dout_t, mm)
    return (as_float64(out.reshape(pr.out_shape)), as_float64(lse.reshape(pr.lse_shape)),
            tuple(as_float64(g) for g in grads))


@contextlib.contextmanager
def _exact_fp32_matmuls(torch):
    """torch's fp32 matmuls on CUDA in exact fp32 (fp32_precision "ieee") for the body, whatever the process
    set: TF32, where a problem allows it, is the yardstick's own rounding (_tf32_matmul)."""
    matmul = torch.backends.cuda.matmul
    name, exact = ("fp32_precision", "ieee") if hasattr(matmul, "fp32_precision") else ("allow_tf32", False)
    before = getattr(matmul, name)
    setattr(matmul, name, exact)
    try:
        yield
    finally:
        setattr(matmul, name, before)


def to_tf32(torch, x):
    """fp32 tensor ``x`` rounded to TF32's 10-bit mantissa, to nearest with ties away from zero (PTX's
    cvt.rna.tf32.f32): half an ulp added to the magnitude's bits, the 13 low bits cleared. inf stays inf;
    values within half a TF32 ulp of fp32's largest round to inf, as cvt.rna does."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & -0x2000).view(torch.float32)


def _tf32_matmul(torch):
    """a @ b (fp32, batched) as TF32 tensor cores compute it: both operands rounded to TF32, the products
    exact and summed in fp32 -- and so its gradients, g @ b^T and a^T @ g with g rounded too."""
    class Tf32MatMul(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):
            a, b = to_tf32(torch, a), to_tf32(torch, b)
            ctx.save_for_backward(a, b)
            return a @ b

        @staticmethod
        def backward(ctx, grad):
            a, b = ctx.saved_tensors
            grad = to_tf32(torch, grad)
            return (grad @ b.transpose(-1, -2) if ctx.needs_input_grad[0] else None,
                    a.transpose(-1, -2) @ grad if ctx.needs_input_grad[1] else None)

    return Tf32MatMul.apply


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


def _dense(torch, pr: problem.Problem, dout, bh_base: int, mm):
    """Torch tensors out (*batch, Hq, L, Ev), lse (*batch, Hq, L) and, given ``dout`` of out's shape, the
    gradients in the inputs' shapes and dtypes. ``bh_base``: the dropout counter's first batch-head; ``mm``:
    the matmul of the problem's precision (torch.matmul, or _tf32_matmul's)."""
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
        s = mm(qc.to(acc), kc.repeat_interleave(g, 0).to(acc).transpose(-1, -2)) * pr.scale
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
        o = mm(P.to(dt), vc.repeat_interleave(g, 0))
        out[b][h0:h1] = o.detach()
        lse[b][h0:h1] = torch.logsumexp(s.detach(), -1)
        if dout is not None:
            for total, rows, grad in zip(sums, (slice(h0, h1), kv, kv, slice(h0, h1)),
                                         torch.autograd.grad(o, leaves, dout[b][h0:h1].to(dt))):
                total[b][rows] = grad
    grads = [total.sum_to_size(x.shape).to(x.dtype).reshape(given.shape)
             for total, x, given in zip(sums, inputs, (pr.q, pr.k, pr.v, pr.mask))]
    return out, lse, grads


def _varlen(torch, pr: problem.Problem, dout, mm):
    """_dense's results for a packed problem, sequence by sequence."""
    device, dt = torch.device(pr.device), getattr(torch, pr.dtype_name)
    out = torch.zeros(pr.out_shape, dtype=dt, device=device)
    lse = torch.full(pr.lse_shape, -torch.inf, dtype=torch.float32, device=device)
    grads = [torch.zeros(x.shape, dtype=dt, device=device) for x in (pr.q, pr.k, pr.v)] if dout is not None else []
    for b, sub, qr, kr in reference.varlen_pieces(pr):
        o, l, gs = _dense(torch, sub, None if dout is None else dout[qr].transpose(0, 1), b * pr.hq, mm)
        out[qr], lse[:, qr] = o.transpose(0, 1), l
        for total, rows, grad in zip(grads, (qr, kr, kr), gs):
            total[rows] = grad.transpose(0, 1)
    return out, lse, grads
