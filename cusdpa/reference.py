"""The reference: attention exactly as docs/DESIGN.md defines it, forward and backward, on NumPy or CuPy.

This module is the oracle every backend is tested against. It is written against an array module
``xp`` so the MATH backend runs the same code on CuPy arrays (fp32 accumulation). It works on
chunks of whole GQA groups of heads, so the L x S score matrix of all heads never exists at once.

Definitions, for one (batch, query head) slice with scores s = cap(scale * q k^T) (+ alibi) (+ float mask),
where cap(x) = softcap * tanh(x / softcap) with soft-capping (softcap > 0) and x without, and ALiBi
(FlashAttention's, aligned bottom-right whatever the causal alignment) adds -slope * |i + S - L - j| with
the slice's slope:
  allowed[i, j] = causal & window & bool mask & (float mask != -inf); s[i, j] = -inf elsewhere
  P = softmax(s) row-wise, with P = 0 on rows where every s is -inf; lse = log sum_j exp(s[i, j])
  A = P * keep / (1 - p) under dropout (keep from cusdpa.philox), else A = P;  out = A v

Non-finite values follow PyTorch's math backend, except where no query may look:
  - Selected out, whatever they hold: a score that is not allowed is -inf before any arithmetic (so a
    -inf float-mask entry hides NaN in q k^T); key/value rows that no query of the slice sees and query
    rows that see no key are zeroed before the products; a row that sees no key gets out 0, lse -inf and
    dq 0 and adds nothing to dk, dv or dmask, however NaN the other rows are. A score of -inf, allowed
    or not (q k^T may overflow), has P = 0 even on a NaN row (PyTorch's softmax gives NaN there), and a
    row whose scores are all -inf sees no key.
  - Everything else is IEEE arithmetic of the formulas above: a NaN or +inf among a row's scores makes
    its P (but at -inf scores), out, lse and dq NaN, and through the products dk of every key of the
    slice and dv of every key the row sees; NaN or inf in a value row reaches out in its columns and,
    through dP, dq and dk; 0 * NaN in the products A v, dS k and dS^T q is NaN, as in PyTorch.
Kernels give NaN and inf where the reference does, with one freedom: where the reference's NaN comes
only from 0 * NaN (or 0 * inf) at a pair whose P is 0 (not allowed, or a -inf score) -- in A v, in
dS = P (dP - D), in dS k or dS^T q -- a kernel that skips the pair's tile or selects per pair may give a
finite value instead. Tests compare NaN patterns on problems without such pairs.
"""
from __future__ import annotations

import contextlib
import dataclasses

import numpy as np

from . import philox, problem

# Score elements per chunk: (heads in chunk) * L * S stays under this, whole GQA groups at a time.
CHUNK_ELEMENTS = 1 << 24


def row_key_bounds(L: int, S: int, causal: bool, lower_right: bool, window, xp=np):
    """(lo, hi): query row i sees keys [lo[i], hi[i]) (none where lo[i] >= hi[i]), from causal and window.

    Both align to the top-left (key j vs query i) or, with lower_right, to the bottom-right
    (key j vs query i + S - L), as FlashAttention and PyTorch's causal_lower_right do.
    """
    diag0 = xp.arange(L) + (S - L if lower_right else 0)  # the key on row i's diagonal
    lo, hi = xp.zeros(L, dtype=xp.int64), xp.full(L, S, dtype=xp.int64)
    left, right = window if window is not None else (-1, -1)
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if left >= 0:
        lo = xp.maximum(lo, diag0 - left)
    if right >= 0:
        hi = xp.minimum(hi, diag0 + right + 1)
    return xp.clip(lo, 0, S), xp.clip(hi, 0, S)


def structural_mask(L: int, S: int, causal: bool, lower_right: bool, window, xp=np):
    """(L, S) bool visibility from causal and window (``row_key_bounds``), or None when everything is
    visible."""
    if not causal and window is None:
        return None
    lo, hi = row_key_bounds(L, S, causal, lower_right, window, xp)
    j = xp.arange(S)[None, :]
    return (j >= lo[:, None]) & (j < hi[:, None])


def _errstate(xp):
    return np.errstate(divide="ignore", invalid="ignore", over="ignore") if xp is np else contextlib.nullcontext()


def _accum_dtype(pr: problem.Problem, accum):
    if accum is not None:
        return np.dtype(accum)
    return np.dtype(np.float64 if pr.xp is np or pr.dtype_name == "float64" else np.float32)


def chunks(pr: problem.Problem):
    """(batch index, flat batch index, h0, h1) with [h0, h1) whole GQA groups of query heads; the
    yardstick (cusdpa.verify.yardstick) walks the same chunks."""
    per_group = max(1, pr.group * pr.L * pr.S)
    heads = pr.group * max(1, CHUNK_ELEMENTS // per_group)
    for flat, b in enumerate(np.ndindex(*pr.batch_shape)):
        for h0 in range(0, pr.hq, heads):
            yield b, flat, h0, min(pr.hq, h0 + heads)


@dataclasses.dataclass
class _Slice:
    """One chunk of heads with everything forward and backward share (all in the accumulation dtype)."""

    q: object  # (n, L, E), rows that see no key zeroed
    k: object  # (n, S, E) kv heads repeated per query head, columns nobody sees zeroed
    v: object  # (n, S, Ev)
    P: object  # (n, L, S) softmax probabilities, before dropout
    drop: object  # (n, L, S) keep / (1 - p), or None without dropout
    lse: object  # (n, L)
    row_any: object  # (n, L, 1): the query row sees at least one key
    cap_grad: object  # (n, L, S) d cap(x) / dx = 1 - tanh^2 with soft-capping, else None


def _slice(pr: problem.Problem, b, bh0: int, h0: int, h1: int, acc, allowed_struct) -> _Slice:
    xp, g = pr.xp, pr.group
    full = pr.batch_shape
    q = xp.broadcast_to(pr.q3, full + pr.q3.shape[-3:])[b][h0:h1].astype(acc)
    kv = slice(h0 // g, -(-h1 // g))
    k = xp.repeat(xp.broadcast_to(pr.k3, full + pr.k3.shape[-3:])[b][kv], g, axis=0).astype(acc)
    v = xp.repeat(xp.broadcast_to(pr.v3, full + pr.v3.shape[-3:])[b][kv], g, axis=0).astype(acc)
    n = h1 - h0

    s = (q @ k.swapaxes(-1, -2)) * acc.type(pr.scale)
    cap_grad = None
    if pr.softcap:
        t = xp.tanh(s / acc.type(pr.softcap))
        s, cap_grad = acc.type(pr.softcap) * t, 1 - t * t
    if pr.alibi_slopes is not None:  # added after the cap, as a float mask: dS passes through unchanged
        slopes = xp.broadcast_to(pr.alibi_slopes, full + (pr.hq,))[b][h0:h1].astype(acc)
        distance = xp.abs(xp.arange(pr.L)[:, None] + (pr.S - pr.L) - xp.arange(pr.S)[None, :]).astype(acc)
        s = s - slopes[:, None, None] * distance
    allowed = allowed_struct
    if pr.mask is not None:
        m = xp.broadcast_to(pr.mask, full + (pr.hq, pr.L, pr.S))[b][h0:h1]
        if pr.mask_kind == "float":
            # -inf selects the score out, like False in a bool mask: NaN in q k^T there stays unseen
            s = xp.where(m == -xp.inf, -xp.inf, s + m.astype(acc))
        else:
            allowed = m if allowed is None else (allowed & m)
    if allowed is not None:
        s = xp.where(allowed, s, -xp.inf)
    visible = s != -xp.inf  # NaN counts as visible, so it propagates where it is seen
    row_any = visible.any(-1, keepdims=True)
    col_any = visible.any(-2)[..., None]
    m_i = s.max(-1, keepdims=True)  # NaN when the row sees a NaN; then p, l_i, P and lse are NaN
    p = xp.exp(s - xp.where(m_i == -xp.inf, 0, m_i))
    l_i = p.sum(-1, keepdims=True)
    lse = (m_i + xp.log(l_i))[..., 0]
    # 0 where not visible (a NaN row's exp(-inf - NaN) included) and on rows that see nothing (0 / 0)
    P = xp.where(visible, p / l_i, 0)

    drop = None
    if pr.dropout_p > 0:
        if pr.dropout_p >= 1:
            drop = xp.zeros((n, pr.L, pr.S), dtype=acc)
        else:
            keep = philox.keep_mask(pr.seed, pr.offset, xp.arange(bh0 + h0, bh0 + h1), pr.L, pr.S,
                                    pr.dropout_p, xp)
            drop = keep.astype(acc) * acc.type(1.0 / (1.0 - pr.dropout_p))
    return _Slice(q=xp.where(row_any, q, 0), k=xp.where(col_any, k, 0), v=xp.where(col_any, v, 0),
                  P=P, drop=drop, lse=lse, row_any=row_any, cap_grad=cap_grad)


def _dense(pr: problem.Problem, acc, bh_base: int, visit):
    """Run ``visit(b, h0, h1, slice)`` over every chunk of a dense problem."""
    allowed_struct = structural_mask(pr.L, pr.S, pr.causal, pr.lower_right, pr.window, pr.xp)
    # NaN/inf is selected out where nobody looks and propagates where a query does: no warnings for either
    with _errstate(pr.xp):
        for b, flat, h0, h1 in chunks(pr):
            visit(b, h0, h1, _slice(pr, b, bh_base + flat * pr.hq, h0, h1, acc, allowed_struct))


def _dense_forward(pr: problem.Problem, acc, bh_base: int = 0):
    xp = pr.xp
    full = pr.batch_shape + (pr.hq, pr.L)
    out = xp.zeros(full + (pr.Ev,), dtype=acc)
    lse = xp.full(full, -xp.inf, dtype=np.float32)
    if pr.L == 0 or pr.S == 0:
        return out, lse

    def visit(b, h0, h1, sl):
        A = sl.P if sl.drop is None else sl.P * sl.drop
        out[b][h0:h1] = xp.where(sl.row_any, A @ sl.v, 0)  # 0 * NaN of a value row others see
        lse[b][h0:h1] = sl.lse

    _dense(pr, acc, bh_base, visit)
    return out, lse


def sum_to_shape(x, shape: tuple):
    """Sum a broadcast result back to the shape of the operand that was broadcast."""
    x = x.sum(axis=tuple(range(x.ndim - len(shape)))) if x.ndim > len(shape) else x
    for axis, size in enumerate(shape):
        if size == 1 and x.shape[axis] != 1:
            x = x.sum(axis=axis, keepdims=True)
    return x


def _dense_backward(pr: problem.Problem, dout, acc, bh_base: int = 0, stats=None):
    xp = pr.xp
    full = pr.batch_shape
    dq = xp.zeros(full + (pr.hq, pr.L, pr.E), dtype=acc)
    dk = xp.zeros(full + (pr.hkv, pr.S, pr.E), dtype=acc)
    dv = xp.zeros(full + (pr.hkv, pr.S, pr.Ev), dtype=acc)
    dmask = None
    if pr.mask_kind == "float":
        mask_full = (1,) * (len(full) + 3 - pr.mask.ndim) + tuple(pr.mask.shape)
        dmask = xp.zeros(mask_full, dtype=acc)
    dout = dout.reshape(full + (pr.hq, pr.L, pr.Ev))
    if stats is not None:
        out_g, lse_g = (x.reshape(full + (pr.hq, pr.L) + tail) for x, tail in zip(stats, ((pr.Ev,), ())))

    def visit(b, h0, h1, sl):
        g = pr.group
        do = xp.where(sl.row_any, dout[b][h0:h1].astype(acc), 0)
        P = sl.P
        dP = do @ sl.v.swapaxes(-1, -2)
        if sl.drop is not None:
            dP = dP * sl.drop
        # softmax backward: dS = P * (dP - D), D = rowsum(P * dP) = rowsum(dout * out). With the caller's
        # out and lse (``stats``) P is exp(s - lse), normalised over every key the forward saw (this call's
        # keys may be a part of them: ring attention), and D comes from that out, as the kernels take both;
        # but where the given lse is this call's own, rounded to float32 as the contract stores it, the rows
        # keep their own P and D, exact in the accumulation dtype (float64 stays float64-accurate).
        D = (P * dP).sum(-1, keepdims=True)
        if stats is not None:
            given = lse_g[b][h0:h1]
            own = (sl.lse.astype(np.float32) == given) | ~sl.row_any[..., 0]
            P = P * xp.where(own, 1, xp.exp(sl.lse - given.astype(acc)))[..., None]
            D = xp.where(own[..., None], D, (do * out_g[b][h0:h1].astype(acc)).sum(-1, keepdims=True))
        A = P if sl.drop is None else P * sl.drop
        # Rows that see nothing: 0, where P = 0 meets NaN in dP through a value row others see.
        dS = xp.where(sl.row_any, P * (dP - D), 0)
        # through the cap to scale * q k^T (a float mask is added after it: its gradient is dS itself)
        dX = dS if sl.cap_grad is None else xp.where(P != 0, dS * sl.cap_grad, 0)
        dq[b][h0:h1] = xp.where(sl.row_any, dX @ sl.k, 0) * acc.type(pr.scale)
        n_groups = (h1 - h0) // g
        dk_h = (dX.swapaxes(-1, -2) @ sl.q) * acc.type(pr.scale)
        dv_h = A.swapaxes(-1, -2) @ do
        # GQA: a kv head's gradient is the sum over the query heads of its group.
        dk[b][h0 // g:h1 // g] += dk_h.reshape(n_groups, g, pr.S, pr.E).sum(1)
        dv[b][h0 // g:h1 // g] += dv_h.reshape(n_groups, g, pr.S, pr.Ev).sum(1)
        if dmask is not None:
            r, heads = dS, slice(h0, h1)
            for axis, size in ((0, mask_full[-3]), (1, mask_full[-2]), (2, mask_full[-1])):
                if size == 1:
                    r = r.sum(axis, keepdims=True)
            if mask_full[-3] == 1:
                heads = slice(0, 1)
            bidx = tuple(bi if mask_full[i] != 1 else 0 for i, bi in enumerate(b))
            dmask[bidx + (heads,)] += r

    if pr.L and pr.S:
        _dense(pr, acc, bh_base, visit)
    grads = [sum_to_shape(dq, pr.q3.shape), sum_to_shape(dk, pr.k3.shape), sum_to_shape(dv, pr.v3.shape)]
    grads = [g.reshape(x.shape).astype(pr.dtype) for g, x in zip(grads, (pr.q, pr.k, pr.v))]
    if dmask is not None:
        grads.append(dmask.reshape(pr.mask.shape).astype(pr.mask.dtype))
    return tuple(grads)


def varlen_pieces(pr: problem.Problem):
    """(b, dense single-sequence problem (H, Lb, E), query tokens, key tokens) of each sequence of a
    varlen problem."""
    vl = pr.varlen
    for b in range(vl.batch):
        qs, qe = int(vl.host_cu_q[b]), int(vl.host_cu_q[b + 1])
        ks, ke = int(vl.host_cu_k[b]), int(vl.host_cu_k[b + 1])
        slopes = pr.alibi_slopes
        if slopes is not None and slopes.ndim == 2:
            slopes = slopes[b if slopes.shape[0] > 1 else 0]
        sub = dataclasses.replace(pr, q=pr.q[qs:qe].swapaxes(0, 1), k=pr.k[ks:ke].swapaxes(0, 1),
                                  v=pr.v[ks:ke].swapaxes(0, 1), batch_shape=(), L=qe - qs, S=ke - ks,
                                  alibi_slopes=slopes, varlen=None, out_rank=3)
        yield b, sub, slice(qs, qe), slice(ks, ke)


def forward(pr: problem.Problem, accum=None):
    """(out, lse) of a validated problem; out has the input dtype, lse is float32."""
    acc = _accum_dtype(pr, accum)
    xp = pr.xp
    if pr.varlen is None:
        out, lse = _dense_forward(pr, acc)
        return out.reshape(pr.out_shape).astype(pr.dtype), lse.reshape(pr.lse_shape)
    out = xp.zeros(pr.out_shape, dtype=pr.dtype)
    lse = xp.full(pr.lse_shape, -xp.inf, dtype=np.float32)
    for b, sub, qr, _ in varlen_pieces(pr):
        o, l = _dense_forward(sub, acc, bh_base=b * pr.hq)
        out[qr] = o.swapaxes(0, 1).astype(pr.dtype)
        lse[:, qr] = l
    return out, lse


def backward(pr: problem.Problem, dout, accum=None, out=None, lse=None):
    """Gradients (dq, dk, dv[, dmask for a float mask]) for the output gradient ``dout``. Given the
    forward's ``out`` and ``lse`` (both or neither), rows whose lse is not this problem's own take the
    probabilities exp(score - lse) and the softmax backward's row sums from out, as the kernels compute
    them: a forward over more keys than this problem's (a chunk of ring attention) then gives this chunk's
    exact part of the gradients."""
    acc = _accum_dtype(pr, accum)
    if pr.varlen is None:
        return _dense_backward(pr, dout, acc, stats=None if out is None else (out, lse))
    xp = pr.xp
    dq, dk, dv = (xp.zeros(x.shape, dtype=acc) for x in (pr.q, pr.k, pr.v))
    for b, sub, qr, kr in varlen_pieces(pr):
        stats = None if out is None else (out[qr].swapaxes(0, 1), lse[:, qr])
        gq, gk, gv = _dense_backward(sub, dout[qr].swapaxes(0, 1), acc, bh_base=b * pr.hq, stats=stats)
        dq[qr] = gq.swapaxes(0, 1)
        dk[kr] = gk.swapaxes(0, 1)
        dv[kr] = gv.swapaxes(0, 1)
    return tuple(g.astype(pr.dtype) for g in (dq, dk, dv))


def _as_numpy(x):
    return x if x is None or isinstance(x, np.ndarray) else x.get()


def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *,
              causal_variant="upper_left", window=None, softcap=0.0, alibi_slopes=None, seed=0, accum=np.float64):
    """Reference (out, lse) in NumPy for dense arrays (CuPy inputs are copied to the host).

    Shapes as ``cusdpa.scaled_dot_product_attention``; out has the input dtype. Tests and
    benchmarks call this, never a copy of it.
    """
    pr = problem.from_dense(*map(_as_numpy, (q, k, v)), _as_numpy(attn_mask),
                            problem.Options(dropout_p, is_causal, scale, enable_gqa, causal_variant, window,
                                            softcap), seed, _as_numpy(alibi_slopes))
    return forward(pr, accum)


def attention_grads(q, k, v, dout, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False, *, causal_variant="upper_left", window=None, softcap=0.0, alibi_slopes=None,
                    seed=0, accum=np.float64):
    """Reference gradients (dq, dk, dv[, dmask]) in NumPy for dense arrays."""
    pr = problem.from_dense(*map(_as_numpy, (q, k, v)), _as_numpy(attn_mask),
                            problem.Options(dropout_p, is_causal, scale, enable_gqa, causal_variant, window,
                                            softcap), seed, _as_numpy(alibi_slopes))
    return backward(pr, _as_numpy(dout), accum)

