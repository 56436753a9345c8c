"""EFFICIENT kernels on a CUDA GPU (CuPy arrays), both variants, against the float64 reference.

Error rule (cusdpa.verify.judge): at most 2x (3x for gradients) PyTorch's own error on the GPU at
the same precision, plus a small floor. PyTorch's baseline is its SDPA with the structure (causal,
window) written as an explicit mask; where PyTorch has no equivalent (our dropout keep-mask,
varlen) it is the same attention written out in torch at the input precision (P rounded to the
input dtype before P @ V, as tensor-core kernels do). Every output is NaN-poisoned before the run.
The grid is FLASH's: L, S in {1, 17, 97, 128, 1025}, E in {32, 40, 64, 72, 128, 256}; the default
run pairs every L with one S, ``-m slow`` runs the whole cross product. Expect minutes: most of it is
Numba compiling one specialisation per dtype, head-dim bucket and mask kind (cached per process).

    python -m pytest -m "gpu and not slow" tests/test_efficient_gpu.py
"""
import dataclasses
import itertools

import numpy as np
import pytest

from cusdpa import problem, reference
from cusdpa.verify.judge import judge

pytestmark = pytest.mark.gpu
SIZES = (1, 17, 97, 128, 1025)
HEAD_DIMS = (32, 40, 64, 72, 128, 256)
PAIRS = tuple(zip(SIZES, SIZES[1:] + SIZES[:1]))  # every L and every S once
VARIANTS = ("portable", "tensor_core")
MASK_SHAPES = {"full": lambda B, H, L, S: (B, H, L, S), "key_padding": lambda B, H, L, S: (B, 1, 1, S),
               "per_head": lambda B, H, L, S: (H, L, S), "2d": lambda B, H, L, S: (L, S),
               "key_only": lambda B, H, L, S: (S,), "query_only": lambda B, H, L, S: (L, 1)}


@pytest.fixture(scope="module")
def gpu():
    import cupy
    import torch

    import kernels_numba

    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA: no same-precision PyTorch baseline")
    return cupy, torch, kernels_numba


def _np_dtype(name):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _to_gpu(cp, x):
    """A CuPy copy of a host array (bf16 through torch and DLPack if CuPy cannot hold it directly)."""
    try:
        return cp.asarray(x)
    except (TypeError, ValueError):
        import torch

        t = torch.from_numpy(np.ascontiguousarray(x).view(np.int16)).view(torch.bfloat16).cuda()
        return cp.from_dlpack(t)


def _host(x):
    return x if isinstance(x, np.ndarray) else x.get()


def _torch(x):
    import cupy
    import torch

    return torch.from_dlpack(cupy.ascontiguousarray(x))  # DLPack has no negative strides


def _allowed(pr_host):
    allowed = reference.structural_mask(pr_host.L, pr_host.S, pr_host.causal, pr_host.lower_right, pr_host.window)
    if pr_host.mask_kind == "bool":
        allowed = pr_host.mask if allowed is None else (allowed & pr_host.mask)
    return allowed


def _baseline(pr, dout, grad, manual):
    """PyTorch's (out, lse, grads) on the GPU at the problem's precision (dense problems)."""
    import torch

    F = torch.nn.functional
    # NaN/inf that tests plant where nobody may look is cleaned here: PyTorch's 0 * NaN would make the
    # baseline error infinite and so the judgement vacuous.
    tq, tk, tv = (torch.nan_to_num(_torch(x), 0.0, 0.0, 0.0).requires_grad_(grad) for x in (pr.q, pr.k, pr.v))
    tm = None
    if pr.mask_kind == "float":
        tm = _torch(pr.mask).detach().clone().requires_grad_(grad)
    host = dataclasses.replace(pr, mask=None if pr.mask is None else _host(pr.mask))
    allowed = _allowed(host)
    bias = tm
    if allowed is not None:
        zero = torch.zeros((), dtype=tq.dtype, device="cuda")
        bias = torch.where(torch.as_tensor(allowed, device="cuda"), tm if tm is not None else zero, -torch.inf)
    if bias is not None:  # PyTorch's CUDA SDPA rejects some low-rank masks that broadcast fine
        bias = bias.expand(pr.batch_shape + (pr.hq, pr.L, pr.S))
    rep = pr.hq // pr.hkv
    if manual:  # the same computation written out: fp32 softmax, P rounded to the input dtype before P @ V
        s = (tq.float() @ tk.float().repeat_interleave(rep, -3).transpose(-1, -2)) * pr.scale
        if bias is not None:
            s = s + bias.float()
        P = torch.softmax(s, -1).nan_to_num(0.0)
        if pr.dropout_p > 0:
            from cusdpa import philox

            bh = np.arange(pr.num_bh).reshape(pr.batch_shape + (pr.hq,))
            keep = torch.as_tensor(philox.keep_mask(pr.seed, pr.offset, bh, pr.L, pr.S, pr.dropout_p), device="cuda")
            P = P * keep / (1 - pr.dropout_p) if pr.dropout_p < 1 else P * 0
        out = P.to(tq.dtype) @ tv.repeat_interleave(rep, -3)
    else:
        out = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=bias, scale=pr.scale, enable_gqa=rep > 1)
    with torch.no_grad():
        s = (tq.float() @ tk.float().repeat_interleave(rep, -3).transpose(-1, -2)) * pr.scale
        if bias is not None:
            s = s + bias.float()
        lse = torch.logsumexp(s, -1)
    grads = []
    if grad:
        out.backward(_torch(dout))
        grads = [t.grad for t in (tq, tk, tv)] + ([tm.grad] if tm is not None else [])
    to_np = lambda t: t.detach().float().cpu().numpy()  # noqa: E731
    return to_np(out), to_np(lse), [to_np(g) for g in grads]


def _wide(pr):
    wide = {name: _host(getattr(pr, name)).astype(np.float64) for name in ("q", "k", "v")}
    mask = None if pr.mask is None else _host(pr.mask)
    if pr.mask_kind == "float":
        mask = mask.astype(np.float64)
    vl = pr.varlen
    if vl is not None:
        vl = dataclasses.replace(vl, cu_seqlens_q=_host(vl.cu_seqlens_q), cu_seqlens_k=_host(vl.cu_seqlens_k))
    return dataclasses.replace(pr, xp=np, dtype=np.dtype(np.float64), mask=mask, varlen=vl, **wide)


def _nan_rows_to_zero(x, ref_lse):
    """PyTorch gives NaN on rows that see no key; the contract (and the reference) give 0."""
    x = np.array(x, dtype=np.float64)
    dead = np.isneginf(ref_lse)
    x[dead] = 0.0
    return x


def run_and_judge(gpu, pr, rng, variant, grad=True, manual=False):
    """EFFICIENT forward/backward on ``pr`` into poisoned outputs; failures against the reference."""
    cp, _, kn = gpu
    from cusdpa.backends import efficient

    with kn.configured(kn.KernelConfig(variant=variant)):
        out, lse = efficient.IMPL.forward(pr, cp.full(pr.out_shape, cp.nan, dtype=pr.dtype),
                                          cp.full(pr.lse_shape, cp.nan, dtype=np.float32))
        dout = _to_gpu(cp, rng.standard_normal(pr.out_shape).astype(pr.dtype)) if grad else None
        wrt = [pr.q, pr.k, pr.v] + ([pr.mask] if pr.mask_kind == "float" else [])
        grads = efficient.IMPL.backward(pr, out, lse, dout, grads=tuple(cp.full(x.shape, cp.nan, x.dtype)
                                                                         for x in wrt)) if grad else ()
    wide = _wide(pr)
    ref_out, ref_lse = reference.forward(wide)
    base_out, base_lse, base_grads = _baseline(pr, dout, grad, manual)
    base_out = _nan_rows_to_zero(base_out, ref_lse)
    failures = [judge("out", out, ref_out, base_out), judge("lse", lse, ref_lse, base_lse)]
    if grad:
        ref_grads = reference.backward(wide, _host(dout).astype(np.float64))
        dq_base = _nan_rows_to_zero(base_grads[0], ref_lse)
        base_grads = [dq_base] + [np.nan_to_num(g) for g in base_grads[1:]]
        failures += [judge(n, g, r, b, factor=3) for n, g, r, b in zip(("dq", "dk", "dv", "dmask"), grads,
                                                                         ref_grads, base_grads)]
    return [f for f in failures if f]


def _dense(gpu, rng, dtype, batch, hq, hkv, L, S, E, Ev, mask_shape=None, mask_kind=None, **kw):
    cp = gpu[0]
    dt = _np_dtype(dtype)
    q, k, v = (_to_gpu(cp, rng.standard_normal(s).astype(dt))
               for s in (batch + (hq, L, E), batch + (hkv, S, E), batch + (hkv, S, Ev)))
    mask = None
    if mask_kind == "bool":
        mask = cp.asarray(rng.random(mask_shape) > 0.25)
    elif mask_kind == "float":
        m = rng.standard_normal(mask_shape)
        mask = _to_gpu(cp, np.where(rng.random(mask_shape) < 0.1, -np.inf, m).astype(dt))
    seed = kw.pop("seed", None)
    return problem.from_dense(q, k, v, mask, problem.Options(enable_gqa=hq != hkv, **kw), seed)


def _skip_unless_variant_runs(gpu, pr, variant):
    if variant == "tensor_core":
        from kernels_numba import tensor_core

        why = tensor_core.reasons(pr)
        if why:
            pytest.skip("; ".join(why))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("E", HEAD_DIMS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_grid(gpu, rng, dtype, E, variant):
    if dtype == "float32" and variant == "tensor_core":
        pytest.skip("the tensor_core variant takes float16/bfloat16")
    failures = []
    for n, (L, S) in enumerate(PAIRS):
        pr = _dense(gpu, rng, dtype, (2,), 2, 2, L, S, E, E, is_causal=n % 2 == 1)
        _skip_unless_variant_runs(gpu, pr, variant)
        failures += [f"L={L} S={S}: {m}" for m in run_and_judge(gpu, pr, rng, variant)]
    assert not failures, "\n".join(failures)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("E", HEAD_DIMS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_grid_cross_product(gpu, rng, dtype, E, variant):
    if dtype == "float32" and variant == "tensor_core":
        pytest.skip("the tensor_core variant takes float16/bfloat16")
    failures = []
    for (L, S), causal in itertools.product(itertools.product(SIZES, SIZES), (False, True)):
        pr = _dense(gpu, rng, dtype, (1,), 2, 1, L, S, E, E, is_causal=causal)
        _skip_unless_variant_runs(gpu, pr, variant)
        failures += [f"L={L} S={S} causal={causal}: {m}" for m in run_and_judge(gpu, pr, rng, variant)]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_every_mask_broadcast_shape(gpu, rng, kind, dtype, variant):
    if dtype == "float32" and variant == "tensor_core":
        pytest.skip("the tensor_core variant takes float16/bfloat16")
    failures = []
    for name, shape in MASK_SHAPES.items():
        pr = _dense(gpu, rng, dtype, (2,), 4, 2, 97, 130, 64, 40, shape(2, 4, 97, 130), kind)
        failures += [f"{name}: {m}" for m in run_and_judge(gpu, pr, rng, variant)]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal_variants_window_gqa(gpu, rng, variant):
    failures = []
    for L, S, kw in ((70, 200, dict(is_causal=True, causal_variant="lower_right")),
                     (200, 70, dict(is_causal=True, causal_variant="lower_right")),
                     (150, 150, dict(window=(40, 7))),
                     (90, 300, dict(is_causal=True, causal_variant="lower_right", window=(33, -1)))):
        pr = _dense(gpu, rng, "bfloat16", (1, 2), 6, 2, L, S, 72, 64, **kw)
        failures += [f"{L}x{S} {kw}: {m}" for m in run_and_judge(gpu, pr, rng, variant)]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("variant", VARIANTS)
def test_dropout_keep_mask_is_bit_identical(gpu, rng, variant):
    """q = 0 makes P uniform; v = identity makes out[i, j] = keep_ij / (S (1 - p)): the mask, read back."""
    cp = gpu[0]
    from cusdpa import philox
    from cusdpa.backends import efficient

    hq, L, S, p, seed, offset = 3, 70, 37, 0.3, (5 << 32) | 77, 9
    q = cp.zeros((2, hq, L, 16), dtype=np.float16)
    k = _to_gpu(cp, rng.standard_normal((2, hq, S, 16)).astype(np.float16))
    v = cp.ascontiguousarray(cp.broadcast_to(cp.eye(S, dtype=np.float16), (2, hq, S, S)))
    pr = problem.from_dense(q, k, v, None, problem.Options(dropout_p=p), (seed, offset))
    with gpu[2].configured(gpu[2].KernelConfig(variant=variant)):
        out, _ = efficient.IMPL.forward(pr)
    want = philox.keep_mask(seed, offset, np.arange(2 * hq).reshape(2, hq), L, S, p)
    assert np.array_equal(_host(out) != 0, want)


@pytest.mark.parametrize("variant", VARIANTS)
def test_dropout_forward_backward(gpu, rng, variant):
    mask_shape = (1, 1, 97, 64)
    pr = _dense(gpu, rng, "float16", (2,), 4, 2, 97, 64, 64, 64, mask_shape, "float", dropout_p=0.2, seed=3,
                is_causal=True)
    assert not (failures := run_and_judge(gpu, pr, rng, variant, manual=True)), "\n".join(failures)


@pytest.mark.parametrize("variant", VARIANTS)
def test_varlen_equals_each_sequence_alone(gpu, rng, variant):
    """A packed batch runs the same arithmetic as each sequence on its own (tiles start at each
    sequence's first row), so the results agree bit for bit; the dense runs are judged elsewhere."""
    cp, _, kn = gpu
    from cusdpa.backends import efficient

    lens_q, lens_k = [70, 0, 129, 5], [64, 9, 200, 0]
    cu = [np.concatenate([[0], np.cumsum(n)]).astype(np.int32) for n in (lens_q, lens_k)]
    q = _to_gpu(cp, rng.standard_normal((sum(lens_q), 4, 64)).astype(np.float16))
    k, v = (_to_gpu(cp, rng.standard_normal((sum(lens_k), 2, 64)).astype(np.float16)) for _ in range(2))
    dout = _to_gpu(cp, rng.standard_normal(q.shape).astype(np.float16))
    failures = []
    for kw in (dict(is_causal=True), dict(is_causal=True, causal_variant="lower_right", window=(16, 0))):
        with kn.configured(kn.KernelConfig(variant=variant)):
            pr = problem.from_varlen(q, k, v, cp.asarray(cu[0]), cp.asarray(cu[1]), 129, 200,
                                     problem.Options(enable_gqa=True, **kw))
            out, lse = efficient.IMPL.forward(pr, cp.full(pr.out_shape, cp.nan, dtype=pr.dtype),
                                              cp.full(pr.lse_shape, cp.nan, dtype=np.float32))
            grads = efficient.IMPL.backward(pr, out, lse, dout, grads=tuple(cp.full(x.shape, cp.nan, x.dtype)
                                                                             for x in (q, k, v)))
            for b in range(len(lens_q)):
                qs, ks = slice(cu[0][b], cu[0][b + 1]), slice(cu[1][b], cu[1][b + 1])
                alone = problem.from_dense(*(x[r].transpose(1, 0, 2) for x, r in ((q, qs), (k, ks), (v, ks))),
                                           None, problem.Options(enable_gqa=True, **kw))
                o, l = efficient.IMPL.forward(alone)
                g = efficient.IMPL.backward(alone, o, l, dout[qs].transpose(1, 0, 2))
                pairs = [("out", out[qs], o.transpose(1, 0, 2)), ("lse", lse[:, qs], l),
                         ("dq", grads[0][qs], g[0].transpose(1, 0, 2)), ("dk", grads[1][ks], g[1].transpose(1, 0, 2)),
                         ("dv", grads[2][ks], g[2].transpose(1, 0, 2))]
                failures += [f"{kw} sequence {b} {name}" for name, a, want in pairs
                             if not cp.array_equal(a, want, equal_nan=True)]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("variant", VARIANTS)
def test_strided_broadcast_and_nan_padding(gpu, rng, variant):
    cp = gpu[0]
    base = _to_gpu(cp, rng.standard_normal((2, 3, 2, 80, 2, 64)).astype(np.float16))
    q = base[:, :, :, :, 0]  # row stride 128 elements, head dim contiguous
    k = _to_gpu(cp, rng.standard_normal((1, 3, 2, 100, 64)).astype(np.float16))  # broadcast over batch
    v = _to_gpu(cp, rng.standard_normal((2, 1, 2, 100, 64)).astype(np.float16))[:, :, :, ::-1]  # negative stride
    keys = np.ones((2, 1, 1, 1, 100), bool)
    keys[0, ..., 60:] = False  # batch 0's padding: no query there may see its last 40 keys
    v[0, :, :, 60:] = cp.nan
    v[0, :, :, 70] = cp.inf
    pr = problem.from_dense(q, k, v, cp.asarray(keys))
    assert not (failures := run_and_judge(gpu, pr, rng, variant)), "\n".join(failures)


def test_empty_sequences(gpu, rng):
    for L, S in ((0, 17), (17, 0)):
        pr = _dense(gpu, rng, "float16", (2,), 2, 2, L, S, 64, 64, is_causal=True)
        from cusdpa.backends import efficient

        out, lse = efficient.IMPL.forward(pr)
        assert out.shape == pr.out_shape and not _host(out).any()
        assert np.all(np.isneginf(_host(lse)))


def test_public_api_runs_on_the_current_stream_and_compiles_once(gpu, rng):
    cp, _, kn = gpu
    import cusdpa
    from kernels_numba import portable, tensor_core

    pr_args = [_to_gpu(cp, rng.standard_normal((2, 4, 300, 64)).astype(np.float16)) for _ in range(3)]
    stream = cp.cuda.Stream(non_blocking=True)
    with stream, cusdpa.sdpa_kernel([cusdpa.Backend.EFFICIENT]):
        assert cusdpa.explain(*pr_args).chosen is cusdpa.Backend.EFFICIENT
        first = cusdpa.scaled_dot_product_attention(*pr_args, is_causal=True)
        compiled = (tensor_core._kernel.cache_info().currsize, portable.forward_kernel.cache_info().currsize,
                    sum(len(f.overloads) for f in (tensor_core._kernel(64, False),)))
        second = cusdpa.scaled_dot_product_attention(*pr_args, is_causal=True)
        stream.synchronize()
    assert (tensor_core._kernel.cache_info().currsize, portable.forward_kernel.cache_info().currsize,
            sum(len(f.overloads) for f in (tensor_core._kernel(64, False),))) == compiled
    assert cp.array_equal(first, second)
