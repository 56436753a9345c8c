"""Forward and backward entry points of the EFFICIENT kernels.

``problem`` is any object with the attributes of ``cusdpa.problem.Problem`` (xp, q, k, v, q3, k3,
v3, batch_shape, hq, hkv, L, S, E, Ev, dtype, scale, mask, mask_kind, causal, lower_right,
window_bounds, dropout_p, seed_words, offset, keep_threshold, dropout_rescale, allow_tf32, varlen, out_shape,
lse_shape, group); this package does not import cusdpa.
Arrays are NumPy under the CUDA simulator, CuPy (or __dlpack__ exporters) on a GPU; kernels run on
CuPy's current stream, and results go into caller-provided arrays when given.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import config as config_module
from . import dq_accumulate, gradients, launcher, layout, portable, tensor_core
from .blocked_forward import forward_kernel
from .layout import cdiv

DTYPES = ("float16", "bfloat16", "float32")
MAX_HEAD_DIM = 256


def reasons(problem) -> list[str]:
    """What these kernels cannot do with this problem (beyond the backend's Capabilities)."""
    if problem.varlen is not None:
        return []
    plan = _plan(problem)
    return [plan] if isinstance(plan, str) else []


def _plan(pr):
    operands = [(pr.q3, 3), (pr.k3, 3), (pr.v3, 3)]
    if pr.mask is not None:
        operands.append((pr.mask, 3))
    return layout.batch_plan(pr.batch_shape, operands)


@dataclass
class _Views:
    """The kernels' views of one problem (see kernels_numba.layout)."""

    q: object
    k: object
    v: object
    mask: object
    cu_q: object
    cu_k: object
    nb1: int
    nb2: int
    n_batch: int  # flat problem batch elements (varlen: sequences)
    plan: object  # BatchPlan, or None for varlen


def _views(pr) -> _Views:
    xp = pr.xp
    if pr.varlen is not None:
        def packed(x):
            return x.transpose(1, 0, 2)[None, None, None]

        vl = pr.varlen
        return _Views(packed(pr.q), packed(pr.k), packed(pr.v), _dummy_mask(xp), vl.cu_seqlens_q, vl.cu_seqlens_k,
                      1, 1, vl.batch, None)
    plan = _plan(pr)
    if isinstance(plan, str):
        raise NotImplementedError(plan)
    q = layout.dense_view(xp, plan, pr.q3, (pr.hq, pr.L, pr.E))
    k = layout.dense_view(xp, plan, pr.k3, (pr.hkv, pr.S, pr.E))
    v = layout.dense_view(xp, plan, pr.v3, (pr.hkv, pr.S, pr.Ev))
    mask = _dummy_mask(xp)
    if pr.mask is not None:
        mask = layout.dense_view(xp, plan, pr.mask, (pr.hq, pr.L, pr.S))
    dummy_cu = layout.placeholder(xp, (1,), np.int32)
    b0, b1, b2 = plan.shape3
    return _Views(q, k, v, mask, dummy_cu, dummy_cu, b1, b2, b0 * b1 * b2, plan)


def _dummy_mask(xp):
    return layout.placeholder(xp, (1,) * 6, bool)


def _rows_view(pr, plan, x, tail):
    """A contiguous result array (problem layout) as the kernels' 6-D / 5-D view."""
    if pr.varlen is not None:
        return (x.transpose(1, 0, 2) if x.ndim == 3 else x)[None, None, None]
    return x.reshape(plan.shape3 + tail)


def _output_view(pr, plan, x):
    """An array of the output's shape (out, dout; dense) as the kernels' 6-D view: in place where
    ``_writes_rows`` allows (torch's token-major layout included) or ``x`` is C-contiguous, else of a
    C-contiguous copy (an expanded or transposed dout): rows of unit stride, which the tensor_core backward
    needs, and one view for every layout, so a plan's recording (cusdpa.backends.efficient.plan) meets the
    kernels the general path prepared. The forward's out is never copied (``_target``)."""
    if not _writes_rows(x):
        x = pr.xp.ascontiguousarray(x)
    return layout.dense_view(pr.xp, plan, x, (pr.hq, pr.L, pr.Ev))


def _blocked_spec(pr, cfg, dkdv: bool) -> gradients.Spec:
    """The portable kernels' specialisation for ``pr``: the forward's and dq's tiles, or (dkdv) dk/dv's."""
    step = max(16, cfg.threads)  # a multiple of threads: each thread owns every threads-th column
    head_dim, head_dim_v = cdiv(pr.E, step) * step, cdiv(pr.Ev, step) * step
    sub_n, sub_m, rows = cfg.blocked_tiles(head_dim, head_dim_v, dkdv)
    mask = {None: portable.MASK_NONE, "bool": portable.MASK_BOOL, "float": portable.MASK_FLOAT}[pr.mask_kind]
    return gradients.Spec(threads=cfg.threads, sub_n=sub_n, sub_m=sub_m, chunk=cfg.chunk, rows=rows,
                          head_dim=head_dim, head_dim_v=head_dim_v, bf16=layout.dtype_name(pr.dtype) == "bfloat16",
                          mask=mask, mask_bf16=pr.mask_kind == "float" and layout.dtype_name(pr.mask.dtype) == "bfloat16",
                          dropout=pr.dropout_p > 0, varlen=pr.varlen is not None,
                          wide=layout.dtype_name(pr.dtype) == "float32")


def _structure_args(pr):
    left, right = pr.window_bounds
    seed_lo, seed_hi = pr.seed_words
    return (pr.causal, pr.lower_right, left, right, seed_lo, seed_hi, pr.offset & 0xFFFFFFFF, pr.keep_threshold,
            pr.dropout_rescale)


def _target(xp, given, shape, dtype, rows=False):
    """The caller's array when the kernels can write it in place, else a fresh one: C-contiguous, or with
    ``rows`` (the output) any layout ``_writes_rows`` takes, such as the token-major one torch's bridge gives."""
    if given is not None and tuple(given.shape) == tuple(shape) and (given.flags.c_contiguous or
                                                                     rows and _writes_rows(given)):
        return given
    return xp.empty(shape, dtype=dtype)


def _writes_rows(x) -> bool:
    """Whether the kernels' 6-D view of ``x`` (..., H, rows, dim) reaches every element once: rows of unit
    stride, the last three dims not overlapping, and the batch dims in C order outside them (so they merge
    as the operands' do, layout.dense_view)."""
    if x.ndim < 3 or (x.shape[-1] > 1 and x.strides[-1] != x.itemsize):
        return False
    extent = x.itemsize
    for stride, n in sorted((x.strides[d], x.shape[d]) for d in range(x.ndim - 3, x.ndim) if x.shape[d] > 1):
        if stride < extent:
            return False
        extent = stride * n
    for d in reversed(range(x.ndim - 3)):
        if x.shape[d] > 1:
            if x.strides[d] != extent:
                return False
            extent *= x.shape[d]
    return True


def _deliver(xp, results, given):
    if given is None:
        return tuple(results)
    for dst, src in zip(given, results):
        if dst is not src:
            xp.copyto(dst, src)
    return tuple(given)


def variant_for(pr, cfg) -> str:
    """The kernel variant that runs this forward: the config's choice, "auto" resolved."""
    if cfg.variant == "portable":
        return "portable"
    why = tensor_core.reasons(pr, cfg)
    if cfg.variant == "tensor_core":
        if why:
            raise NotImplementedError("the tensor_core variant cannot run this problem: " + "; ".join(why))
        return "tensor_core"
    return "portable" if why else "tensor_core"


def fuses(pr, cfg, deterministic: bool) -> bool:
    """Whether a backward of ``pr`` runs fused (dQ through an fp32 accumulator with atomics): where the
    tensor_core variant runs and _fusable."""
    return _fusable(pr, cfg, deterministic) and variant_for(pr, cfg) == "tensor_core"


def _fusable(pr, cfg, deterministic: bool) -> bool:
    """Whether a tensor_core backward of ``pr`` runs fused: a backward not asked to be deterministic, and not with
    KernelConfig.fused_backward_head_dim 0 (never); 16-bit types up to that head dim (whole rows per warp:
    tensor_core.col_parts); fp32 at every head dim, past 96 on column parts in dynamic shared memory (it measured
    faster at each, BENCHMARKS.md)."""
    head_dim, dtype = tensor_core.head_dim_for(pr.E, pr.Ev), layout.dtype_name(pr.dtype)
    if deterministic or cfg.fused_backward_head_dim == 0:
        return False
    whole = tensor_core.col_parts(head_dim, dtype) == 1
    if dtype == "float32":
        return whole or cfg.tensor_core_dynamic_smem
    return whole and head_dim <= cfg.fused_backward_head_dim


def dq_accum_elements(pr) -> int:
    """fp32 elements of the fused backward's dQ accumulator: dq's rows at the padded head dim."""
    rows = pr.q.shape[0] if pr.varlen is not None else math.prod(pr.batch_shape) * pr.L
    return rows * pr.hq * tensor_core.head_dim_for(pr.E, pr.Ev)


def forward(pr, out=None, lse=None, config=None):
    """(out, lse) of ``pr``; out has pr.out_shape and the input dtype, lse is float32 pr.lse_shape."""
    cfg = config or config_module.current()
    xp = pr.xp
    out_t = _target(xp, out, pr.out_shape, pr.dtype, rows=pr.varlen is None)
    lse_t = _target(xp, lse, pr.lse_shape, np.float32)
    if lse_t.size == 0 or pr.k.size == 0:
        out_t[...] = 0
        lse_t[...] = -np.inf
        return _deliver(xp, (out_t, lse_t), None if out is None else (out, lse))
    views = _views(pr)
    plan = views.plan
    if pr.varlen is None:
        out_v = _output_view(pr, plan, out_t)
        lse_v = _rows_view(pr, plan, lse_t.reshape(pr.batch_shape + (pr.hq, pr.L)), (pr.hq, pr.L))
    else:
        out_v, lse_v = _rows_view(pr, plan, out_t, None), lse_t[None, None, None]
    device = layout.device_of(pr.q)
    if variant_for(pr, cfg) == "tensor_core":
        tensor_core.forward(pr, views, out_v, lse_v, device, _structure_args(pr), cfg)
    else:
        spec = _blocked_spec(pr, cfg, False)
        grid = (views.n_batch * pr.hq, cdiv(pr.L, spec.block_m))
        arrays = [layout.bits(x) for x in (views.q, views.k, views.v, views.mask, out_v, lse_v, views.cu_q, views.cu_k)]
        launcher.launch(forward_kernel(spec), grid, cfg.threads ** 2, device,
                        (*arrays, views.nb1, views.nb2, pr.hq, pr.group, pr.L, pr.S, pr.E, pr.Ev, pr.scale,
                         *_structure_args(pr)))
    return _deliver(xp, (out_t, lse_t), None if out is None else (out, lse))


def backward(pr, out, lse, dout, grads=None, config=None, delta=None, deterministic=False, dq_accum=None):
    """(dq, dk, dv[, dmask]) for output gradient ``dout``.

    A float mask's gradient is computed when ``grads`` is None or holds a fourth array for it (the torch op
    passes three when the mask requires no gradient). ``delta``: a float32 array shaped like lse for the
    kernels' per-row D (allocated when None; a plan passes its own). Bit-identical run to run (no atomics)
    except where the tensor_core backward runs fused (fuses: KernelConfig.fused_backward_head_dim,
    not ``deterministic``), adding dQ into an fp32 accumulator with atomics: ``dq_accum``, a float32 array of at least
    ``dq_accum_elements(pr)`` elements (allocated when None; a plan passes its own workspace).

    The tensor_core variant runs where its forward does and q, k and v are not broadcast over batch dims.
    delta is rowsum(dout * out), as FlashAttention takes it, except where a broadcast float mask's gradient
    needs it exact or ``out`` is None: the portable dq kernel then sums rowsum(P * dP) in fp32 (see
    gradients.py). With KernelConfig.tensor_core_mask_grad_sum, a float mask broadcast over batch, heads or queries
    but not keys has its gradient on the tensor_core backward instead (not ``deterministic``): the dq kernel adds dS
    into fp32 sums with atomics.
    """
    cfg = config or config_module.current()
    xp = pr.xp
    targets = [_target(xp, None if grads is None else grads[n], x.shape, pr.dtype)
               for n, x in enumerate((pr.q, pr.k, pr.v))]
    want_dmask = pr.mask_kind == "float" and (grads is None or len(grads) > 3)
    if want_dmask:
        targets.append(_target(xp, None if grads is None else grads[3], pr.mask.shape, pr.mask.dtype))
    if pr.q.size == 0 or pr.k.size == 0:
        for t in targets:
            t[...] = 0
        return _deliver(xp, targets, grads)
    views = _views(pr)
    plan = views.plan
    varlen = pr.varlen is not None
    if varlen:
        dout_v, lse_v = (_rows_view(pr, plan, x, None) for x in (dout, lse))
        delta_v = _target(xp, delta, lse.shape, np.float32)[None, None, None]
        dq_v, dk_v, dv_v = (_rows_view(pr, plan, t, None) for t in targets[:3])
        own_q = own_k = own_v = (1, 1, 1)
        n_own_q, n_own_k, n_own_v = (pr.varlen.batch,) * 3
        reps_q = reps_k = reps_v = 1
    else:
        full5 = pr.batch_shape + (pr.hq, pr.L)
        dout_v = _output_view(pr, plan, dout)
        lse_v = _rows_view(pr, plan, lse.reshape(full5), (pr.hq, pr.L))
        delta_v = _rows_view(pr, plan, _target(xp, delta, pr.lse_shape, np.float32).reshape(full5), (pr.hq, pr.L))
        own_q, own_k, own_v = (plan.own3(x) for x in (pr.q3, pr.k3, pr.v3))
        dq_v = targets[0].reshape(own_q + pr.q3.shape[-3:])
        dk_v = targets[1].reshape(own_k + pr.k3.shape[-3:])
        dv_v = targets[2].reshape(own_v + pr.v3.shape[-3:])
        n_full = views.n_batch
        n_own_q, n_own_k, n_own_v = (math.prod(o) for o in (own_q, own_k, own_v))
        reps_q, reps_k, reps_v = n_full // n_own_q, n_full // n_own_k, n_full // n_own_v
    dmask_direct = False
    dmask_v = layout.placeholder(xp, (1,) * 6, np.float32)  # written only where dmask_direct
    if want_dmask:
        mask_tail = (1,) * (3 + plan.nb - pr.mask.ndim) + tuple(pr.mask.shape)
        dshape = plan.own3(pr.mask.reshape(mask_tail)) + mask_tail[-3:]
        full6 = plan.shape3 + (pr.hq, pr.L, pr.S)
        dmask_v = targets[3].reshape(dshape)
        dmask_direct = dshape == full6
    structure = _structure_args(pr)
    device = layout.device_of(pr.q)
    # delta = rowsum(dout * out), FlashAttention's, except for a broadcast float mask's gradient: it sums dS
    # over scores, where sum_j dS_ij = rowsum(P * dP) - delta_i cancels, and delta from the rounded output
    # leaves its rounding error there (measured: 1.7e-3 against PyTorch's 7e-7 on a (L, 1) mask); the
    # portable dq kernel then sums rowsum(P * dP) itself.
    out_v = None
    if out is not None:
        out_v = _rows_view(pr, plan, out, None) if varlen else _output_view(pr, plan, out)
    on_tensor_cores = out_v is not None and reps_q == reps_k == reps_v == 1 and \
        variant_for(pr, cfg) == "tensor_core" and all(x.strides[-1] == x.itemsize for x in (dout_v, out_v))
    # a gradient summed over the mask's broadcast batch, head or query dims, not over keys (rows of dS cancel there)
    mask_grad_sum = want_dmask and not dmask_direct and on_tensor_cores and cfg.tensor_core_mask_grad_sum and \
        not deterministic and dshape[-1] == full6[-1]
    if want_dmask and not mask_grad_sum:  # (the sums' pass writes every entry)
        targets[3][...] = 0  # the dq kernel writes only the visible scores' entries
    delta_from_out = out is not None and not (want_dmask and not dmask_direct and not mask_grad_sum)
    if delta_from_out and on_tensor_cores:
        accum = None
        if _fusable(pr, cfg, deterministic) and not want_dmask:  # (the variant decided above)
            shape = dq_v.shape[:-1] + (tensor_core.head_dim_for(pr.E, pr.Ev),)
            accum = (xp.empty(shape, np.float32) if dq_accum is None else
                     dq_accum[:math.prod(shape)].reshape(shape))
        sums = xp.zeros(dshape, np.float32) if mask_grad_sum else None
        tensor_core.backward(pr, views, (dout_v, out_v, lse_v, delta_v, dq_v, dk_v, dv_v),
                             xp.broadcast_to(sums, full6) if mask_grad_sum else dmask_v if dmask_direct else None,
                             device, structure, cfg, accum, mask_grad_sum=mask_grad_sum)
        if mask_grad_sum:  # the fp32 sums rounded into the mask's dtype
            passes, cols = dq_accumulate.launch_shape(dmask_v)
            launcher.launch(dq_accumulate.convert_kernel(layout.dtype_name(pr.mask.dtype) == "bfloat16"), passes,
                            dq_accumulate.THREADS, device, (sums, layout.bits(dmask_v), 1.0, cols))
        return _deliver(xp, targets, grads)
    dq_spec, dkdv_spec = _blocked_spec(pr, cfg, False), _blocked_spec(pr, cfg, True)
    threads = cfg.threads ** 2
    q, k, v, mask, dout_b = (layout.bits(x) for x in (views.q, views.k, views.v, views.mask, dout_v))
    if not delta_from_out:
        # the dq kernel moves lse to the normaliser of its own scores (gradients.reduce_delta), for itself and the
        # dk/dv and dmask kernels: in a copy, the caller's lse stays the forward's
        lse_v = lse_v.copy()
    reads = (q, k, v, mask, dout_b, lse_v, delta_v)
    out_b = layout.bits(out_v) if delta_from_out else dout_b  # dout stands in where out is not read
    launcher.launch(gradients.dq_kernel(dq_spec, dmask_direct, delta_from_out),
                    (n_own_q * pr.hq, cdiv(pr.L, dq_spec.block_m)), threads, device,
                    (*reads[:5], out_b, *reads[5:], layout.bits(dq_v), layout.bits(dmask_v), views.cu_q, views.cu_k,
                     views.nb1, views.nb2, own_q[1], own_q[2], reps_q, pr.hq, pr.group, pr.L, pr.S, pr.E, pr.Ev,
                     pr.scale, *structure))
    dkdv = gradients.dkdv_kernel(dkdv_spec)
    launches = [(own_k, n_own_k, reps_k, True, True)] if own_k == own_v else \
        [(own_k, n_own_k, reps_k, True, False), (own_v, n_own_v, reps_v, False, True)]
    for own, n_own, reps, want_dk, want_dv in launches:
        launcher.launch(dkdv, (n_own * pr.hkv, cdiv(pr.S, dkdv_spec.block_n)), threads, device,
                        (*reads, layout.bits(dk_v), layout.bits(dv_v), views.cu_q, views.cu_k, views.nb1, views.nb2,
                         own[1], own[2], reps, want_dk, want_dv, pr.hq, pr.hkv, pr.group, pr.L, pr.S, pr.E, pr.Ev,
                         pr.scale, *structure))
    if want_dmask and not dmask_direct:
        n = math.prod(dshape)
        launcher.launch(gradients.dmask_kernel(dq_spec), cdiv(n, threads), threads, device,
                        (*reads, layout.bits(dmask_v), tuple(dshape), tuple(full6), pr.group, pr.E, pr.Ev, pr.scale,
                         *structure))
    return _deliver(xp, targets, grads)
