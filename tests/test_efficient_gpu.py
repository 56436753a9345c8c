"""EFFICIENT kernels on a CUDA GPU (CuPy arrays), both variants, against the float64 reference.

Every case goes through the one harness (cusdpa.verify.harness.run_problem): outputs NaN-poisoned
before the kernels write them, then judged by the error rule of cusdpa.verify.judge (at most 2x, 3x for
gradients, the error of PyTorch at the same precision on the GPU, cusdpa.verify.yardstick, plus a
floor). The grid is FLASH's: L, S in {1, 17, 97, 128, 1025}, E in {32, 40, 64, 72, 128, 256}; the
default run pairs every L with one S, ``-m slow`` runs the whole cross product. Expect minutes: most
of it is Numba compiling one specialisation per dtype, head-dim bucket and mask kind (cached per process).

    python -m pytest -m "gpu and not slow" tests/test_efficient_gpu.py
"""
import itertools

import numpy as np
import pytest

from cusdpa import problem
from cusdpa.verify import harness
from cusdpa.verify.harness import Case

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


def _host(x):
    return x if isinstance(x, np.ndarray) else x.get()


def _failures(gpu, pr, rng, variant, **knobs):
    """EFFICIENT's failures on the validated problem ``pr`` with the kernel ``variant`` (and other KernelConfig
    ``knobs``; the tensor_core variant takes fp32 too), from the harness."""
    from cusdpa.backends import efficient

    kn = gpu[2]
    knobs = {"tensor_core_fp32": variant == "tensor_core", **knobs}
    with kn.configured(kn.KernelConfig(variant=variant, **knobs)):
        return harness.run_problem(pr, efficient.IMPL, rng)


def _results(gpu, pr, dout, **knobs):
    """out, lse and the gradients (a float mask's too) of the tensor_core kernels with KernelConfig ``knobs``, on
    the host: for knobs that change where a block's work runs or how its operands arrive, not its arithmetic,
    whose results must equal the default's bit for bit."""
    from cusdpa.backends import efficient

    kn = gpu[2]
    with kn.configured(kn.KernelConfig(variant="tensor_core", tensor_core_fp32=True, **knobs)):
        out, lse = efficient.IMPL.forward(pr)
        wrt = [pr.q, pr.k, pr.v] + ([pr.mask] if pr.mask_kind == "float" else [])
        # deterministic: the fused backward's atomics would vary dQ's bits run to run
        grads = efficient.IMPL.backward(pr, out, lse, dout, True, tuple(pr.xp.empty_like(x) for x in wrt))
    return [_host(x) for x in (out, lse, *grads)]


def _same_bits(gpu, pr, rng, base=None, **knobs) -> list[str]:
    """Which of out, lse and the gradients under KernelConfig ``knobs`` differ from the default's (both on the
    ``base`` knobs, a dict)."""
    base = base or {}
    dout = pr.xp.asarray(harness.draw(rng, pr.out_shape, pr.dtype_name))
    names = ("out", "lse", "dq", "dk", "dv", "dmask")
    return [f"{name} differs from the default's" for name, got, want in
            zip(names, _results(gpu, pr, dout, **{**base, **knobs}), _results(gpu, pr, dout, **base))
            if not np.array_equal(got.view(np.uint8), want.view(np.uint8))]


def _case_failures(gpu, case, rng, variant):
    return [f"{case}: {m}" for m in _failures(gpu, harness.build(case, gpu[0], rng), rng, variant)]


def _skip_unless_variant_runs(pr, variant):
    if variant == "tensor_core":
        from kernels_numba import KernelConfig, tensor_core

        why = tensor_core.reasons(pr, KernelConfig(tensor_core_fp32=True))
        if why:
            pytest.skip("; ".join(why))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("E", HEAD_DIMS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_grid(gpu, rng, dtype, E, variant):
    failures = []
    for n, (L, S) in enumerate(PAIRS):
        pr = harness.build(Case(dtype, batch=(2,), L=L, S=S, E=E, causal="upper_left" if n % 2 else None), gpu[0],
                           rng)
        _skip_unless_variant_runs(pr, variant)
        failures += [f"L={L} S={S}: {m}" for m in _failures(gpu, pr, rng, variant)]
    assert not failures, "\n".join(failures)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("E", HEAD_DIMS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_grid_cross_product(gpu, rng, dtype, E, variant):
    failures = []
    for (L, S), causal in itertools.product(itertools.product(SIZES, SIZES), (False, True)):
        case = Case(dtype, batch=(1,), hq=2, hkv=1, L=L, S=S, E=E, causal="upper_left" if causal else None)
        pr = harness.build(case, gpu[0], rng)
        _skip_unless_variant_runs(pr, variant)
        failures += [f"L={L} S={S} causal={causal}: {m}" for m in _failures(gpu, pr, rng, variant)]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_every_mask_broadcast_shape(gpu, rng, kind, dtype, variant):
    failures = []
    for name, shape in MASK_SHAPES.items():
        case = Case(dtype, batch=(2,), hq=4, hkv=2, L=97, S=130, E=64, Ev=40, mask=kind,
                    mask_shape=shape(2, 4, 97, 130))
        failures += [f"{name}: {m}" for m in _failures(gpu, harness.build(case, gpu[0], rng), rng, variant)]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal_variants_window_gqa(gpu, rng, variant):
    failures = []
    for L, S, kw in ((70, 200, dict(causal="lower_right")), (200, 70, dict(causal="lower_right")),
                     (150, 150, dict(window=(40, 7))), (90, 300, dict(causal="lower_right", window=(33, -1)))):
        failures += _case_failures(gpu, Case("bfloat16", batch=(1, 2), hq=6, hkv=2, L=L, S=S, E=72, Ev=64, **kw), rng,
                                   variant)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("variant", VARIANTS)
def test_dropout_keep_mask_is_bit_identical(gpu, rng, variant):
    """q = 0 makes P uniform; v = identity makes out[i, j] = keep_ij / (S (1 - p)): the mask, read back."""
    cp = gpu[0]
    from cusdpa import philox
    from cusdpa.backends import efficient

    hq, L, S, p, seed, offset = 3, 70, 37, 0.3, (5 << 32) | 77, 9
    q = cp.zeros((2, hq, L, 16), dtype=np.float16)
    k = cp.asarray(rng.standard_normal((2, hq, S, 16)).astype(np.float16))
    v = cp.ascontiguousarray(cp.broadcast_to(cp.eye(S, dtype=np.float16), (2, hq, S, S)))
    pr = problem.from_dense(q, k, v, None, problem.Options(dropout_p=p), (seed, offset))
    with gpu[2].configured(gpu[2].KernelConfig(variant=variant)):
        out, _ = efficient.IMPL.forward(pr)
    want = philox.keep_mask(seed, offset, np.arange(2 * hq).reshape(2, hq), L, S, p)
    assert np.array_equal(_host(out) != 0, want)


@pytest.mark.parametrize("variant", VARIANTS)
def test_dropout_forward_backward(gpu, rng, variant):
    case = Case("float16", batch=(2,), hq=4, hkv=2, L=97, S=64, E=64, mask="float", mask_shape=(1, 1, 97, 64),
                dropout_p=0.2, seed=3, causal="upper_left")
    assert not (failures := _case_failures(gpu, case, rng, variant)), "\n".join(failures)


@pytest.mark.parametrize("variant", VARIANTS)
def test_varlen_equals_each_sequence_alone(gpu, rng, variant):
    """A packed batch runs the same arithmetic as each sequence on its own (tiles start at each
    sequence's first row), so the results agree bit for bit; the dense runs are judged elsewhere."""
    cp, _, kn = gpu
    from cusdpa.backends import efficient

    lens_q, lens_k = [70, 0, 129, 5], [64, 9, 200, 0]
    cu = [np.concatenate([[0], np.cumsum(n)]).astype(np.int32) for n in (lens_q, lens_k)]
    q = cp.asarray(rng.standard_normal((sum(lens_q), 4, 64)).astype(np.float16))
    k, v = (cp.asarray(rng.standard_normal((sum(lens_k), 2, 64)).astype(np.float16)) for _ in range(2))
    dout = cp.asarray(rng.standard_normal(q.shape).astype(np.float16))
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
    base = cp.asarray(rng.standard_normal((2, 3, 2, 80, 2, 64)).astype(np.float16))
    q = base[:, :, :, :, 0]  # row stride 128 elements, head dim contiguous
    k = cp.asarray(rng.standard_normal((1, 3, 2, 100, 64)).astype(np.float16))  # broadcast over batch
    v = cp.asarray(rng.standard_normal((2, 1, 2, 100, 64)).astype(np.float16))[:, :, :, ::-1]  # negative stride
    keys = np.ones((2, 1, 1, 1, 100), bool)
    keys[0, ..., 60:] = False  # batch 0's padding: no query there may see its last 40 keys
    v[0, :, :, 60:] = cp.nan
    v[0, :, :, 70] = cp.inf
    pr = problem.from_dense(q, k, v, cp.asarray(keys))
    assert not (failures := _failures(gpu, pr, rng, variant)), "\n".join(failures)


def test_empty_sequences(gpu, rng):
    from cusdpa.backends import efficient

    for L, S in ((0, 17), (17, 0)):
        pr = harness.build(Case("float16", batch=(2,), L=L, S=S, E=64, causal="upper_left"), gpu[0], rng)
        out, lse = efficient.IMPL.forward(pr)
        assert out.shape == pr.out_shape and not _host(out).any()
        assert np.all(np.isneginf(_host(lse)))


def test_portable_backward_normalises_p_over_its_own_scores(gpu, rng):
    """A broadcast float mask's gradient runs the portable backward, whose dq kernel sums rowsum(P * dP) and
    rowsum(P) and moves lse by log(rowsum(P)): the forward's lse may come from other arithmetic (the tensor_core
    loops' fp32 is TF32 products of split operands), and P summing to 1 + eps scaled every dS of the row by it
    and left sum_j dS_ij = -delta_i eps (fp32 float masks 2-10x PyTorch's error, test_mask_tiles). An lse off by
    row offsets of 1e-5 then leaves the judged gradients as accurate as the forward's own, and the caller's
    lse as it was."""
    from cusdpa.backends import efficient

    cp, _, kn = gpu
    failures = []
    for case in (Case("float32", batch=(2,), hq=4, hkv=2, L=70, S=160, E=64, mask="float", mask_shape=(4, 70, 160)),
                 Case("float32", batch=(2,), hq=2, hkv=2, L=50, S=64, E=64, mask="float", mask_shape=(50, 1))):
        pr = harness.build(case, cp, rng)
        dout = cp.asarray(harness.draw(rng, pr.out_shape, pr.dtype_name))
        expected = harness.expect(pr, dout)
        with kn.configured(kn.KernelConfig(variant="portable")):
            out, lse = efficient.IMPL.forward(pr)
            shifted = lse + cp.asarray(1e-5 * rng.standard_normal(lse.shape), dtype=cp.float32)
            given = shifted.copy()
            grads = efficient.IMPL.backward(pr, out, shifted, dout, False,
                                            tuple(cp.empty_like(x) for x in (pr.q, pr.k, pr.v, pr.mask)))
        assert cp.array_equal(shifted, given)
        failures += [f"{case}: {m}" for m in harness.judged(expected, dict(zip(harness.GRADS, grads)))[1]]
    assert not failures, "\n".join(failures)


def test_tensor_core_backward_runs_where_it_applies(gpu, rng, monkeypatch):
    """The tensor_core variant's gradients come from its own kernels (efficient_bwd.cuh) and match the reference,
    a direct float mask's gradient too; q broadcast over a batch dim (one own batch element for several problem
    ones) goes to the portable backward."""
    cp, _, kn = gpu
    from kernels_numba import tensor_core

    calls = []
    real = tensor_core.backward
    monkeypatch.setattr(tensor_core, "backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    case = Case("bfloat16", batch=(2,), hq=4, hkv=2, L=130, S=150, E=64, mask="float", mask_shape=(2, 4, 130, 150),
                causal="lower_right")
    assert not (failures := _case_failures(gpu, case, rng, "tensor_core")), "\n".join(failures)
    assert calls
    q = cp.asarray(harness.draw(rng, (1, 4, 130, 64), "float16"))
    k, v = (cp.asarray(harness.draw(rng, (2, 4, 150, 64), "float16")) for _ in range(2))
    pr = problem.from_dense(q, k, v)  # one query batch element against two: dq sums over both
    before = len(calls)
    assert not (failures := _failures(gpu, pr, rng, "tensor_core")), "\n".join(failures)
    case = Case("float16", batch=(2,), hq=4, hkv=2, L=97, S=130, E=64, mask="float", mask_shape=(97, 1))
    assert not (failures := _case_failures(gpu, case, rng, "tensor_core")), "\n".join(failures)
    assert len(calls) == before


def test_public_api_runs_on_the_current_stream_and_compiles_once(gpu, rng, monkeypatch):
    cp, _, kn = gpu
    import cusdpa
    from kernels_numba import blocked_forward, launcher, tensor_core

    # the kernels the first call launches, as launched: rebuilding tensor_core._kernel's cache key here went
    # stale each time the forward's arguments grew (a register cap per loop, fp32's split flags)
    launched = []
    launch = launcher.launch
    monkeypatch.setattr(launcher, "launch", lambda kernel, *a, **k: (launched.append(kernel), launch(kernel, *a, **k)))
    pr_args = [cp.asarray(rng.standard_normal((2, 4, 300, 64)).astype(np.float16)) for _ in range(3)]
    stream = cp.cuda.Stream(non_blocking=True)
    with stream, cusdpa.sdpa_kernel([cusdpa.Backend.EFFICIENT]):
        assert cusdpa.explain(*pr_args).chosen is cusdpa.Backend.EFFICIENT
        first = cusdpa.scaled_dot_product_attention(*pr_args, is_causal=True)
        assert launched, "the first call launched no kernel through kernels_numba.launcher"
        kernels = list(launched)  # the first call's (later calls append theirs to `launched`)

        def compiled():
            return (tensor_core._kernel.cache_info().currsize, blocked_forward.forward_kernel.cache_info().currsize,
                    [len(kernel.overloads) for kernel in kernels])

        before = compiled()
        second = cusdpa.scaled_dot_product_attention(*pr_args, is_causal=True)
        stream.synchronize()
    assert compiled() == before and all(n == 1 for n in before[2]), before
    assert cp.array_equal(first, second)


@pytest.mark.parametrize("variant, dtype, mask", [("tensor_core", "float16", "bool"),
                                                  ("portable", "float32", "float"),
                                                  ("portable", "bfloat16", "key_padding")])
def test_repeated_calls_launch_prepared_kernels(gpu, rng, variant, dtype, mask):
    """KernelConfig.prepared_launches (kernels_numba.launcher): a call whose argument signature was seen
    launches each kernel straight through cuLaunchKernel; the second call's forward and gradients (the mask's
    too, through the dmask kernel's tuple arguments where it broadcasts) are bit-identical to the first's,
    which went through Numba's dispatcher, and every kernel of it was prepared (none left to Numba's path)."""
    cp, _, kn = gpu
    import cusdpa
    from kernels_numba import launcher

    q, k, v, dout = (cp.asarray(harness.draw(rng, (2, 4, 150, 64), dtype)) for _ in range(4))
    attn_mask = {"bool": cp.asarray(rng.random((2, 1, 150, 150)) > 0.2),
                 "float": cp.asarray(rng.standard_normal((4, 150, 150)).astype(np.float32)),
                 "key_padding": cp.asarray(np.arange(150) < 120)[None, None, None].repeat(2, 0)}[mask]
    seen = set(launcher._prepared)
    runs = []
    with kn.configured(kn.KernelConfig(variant=variant, prepared_launches=True)), \
            cusdpa.sdpa_kernel([cusdpa.Backend.EFFICIENT]):
        for _ in range(2):
            out, vjp = cusdpa.attention_vjp(q, k, v, attn_mask, is_causal=True, dropout_p=0.1, seed=5)
            runs.append((out, *vjp(dout)))
    cp.cuda.Device().synchronize()
    for first, second in zip(*runs):  # as bits: bf16 arrays compare through their uint16 views
        assert cp.array_equal(first.view(cp.uint16) if first.itemsize == 2 else first,
                              second.view(cp.uint16) if second.itemsize == 2 else second)
    new = set(launcher._prepared) - seen
    assert new and all(isinstance(launcher._prepared[key], launcher._Prepared) for key in new)


@pytest.mark.parametrize("variant, dtype", [("tensor_core", "bfloat16"), ("portable", "float32")])
def test_repeated_cupy_calls_replay_a_plan(gpu, rng, variant, dtype, monkeypatch):
    """A repeated dense call on CuPy arrays replays a plan of EFFICIENT's launches (cusdpa.backends.plans),
    recorded once the first call prepared them: the same bits as the general path, dropout included."""
    cp, _, kn = gpu
    import cusdpa
    from cusdpa.backends import plans

    q, k, v = (cp.asarray(harness.draw(rng, shape, dtype)) for shape in ((2, 4, 150, 64), (2, 2, 170, 64),
                                                                         (2, 2, 170, 64)))
    kw = dict(is_causal=True, enable_gqa=True, dropout_p=0.1, seed=9)
    plans._plans.clear()
    with kn.configured(kn.KernelConfig(variant=variant)), cusdpa.sdpa_kernel([cusdpa.Backend.EFFICIENT]):
        outs = [cusdpa.scaled_dot_product_attention(q, k, v, **kw) for _ in range(3)]
        (plan,) = plans._plans.values()
        assert plan is not None and plan.backend == "efficient" and not plan.backward
        monkeypatch.setattr(plans, "lookup", lambda signature, make: None)
        want = cusdpa.scaled_dot_product_attention(q, k, v, **kw)
    for out in outs:
        assert cp.array_equal(out.view(cp.uint16) if out.itemsize == 2 else out,
                              want.view(cp.uint16) if want.itemsize == 2 else want)


def test_broadcast_float_masks_gradient_sums_on_the_tensor_core_loops(gpu, rng, monkeypatch):
    """KernelConfig.tensor_core_mask_grad_sum: float masks broadcast over batch, heads or queries (not keys) get
    their gradient from the tensor_core dq kernel's fp32 sums, with causal, GQA, dropout, column parts, each mask
    dtype and an odd key count, judged against the reference; no portable kernel runs. Each with the slices that
    share a sum side by side (KernelConfig.mask_order_group, the default 4; groups of 2, 3 and 4 along batch or
    heads) and one slice's blocks in a row (0)."""
    from kernels_numba import gradients, tensor_core

    portable, orders = [], set()
    real, real_order = gradients.dq_kernel, tensor_core.grid_order
    monkeypatch.setattr(gradients, "dq_kernel", lambda *a: portable.append(1) or real(*a))
    monkeypatch.setattr(tensor_core, "grid_order", lambda *a: orders.add(real_order(*a)) or real_order(*a))
    cases = [Case("bfloat16", batch=(2,), hq=4, hkv=2, L=97, S=130, E=64, mask="float", mask_shape=(1, 4, 97, 130),
                  causal="lower_right"),
             Case("float16", batch=(3,), hq=2, hkv=2, L=70, S=90, E=128, mask="float", mask_shape=(3, 1, 70, 90),
                  dropout_p=0.1),
             Case("float32", batch=(2,), hq=4, hkv=1, L=50, S=76, E=64, mask="float", mask_shape=(76,),
                  mask_dtype="float64"),
             Case("bfloat16", batch=(2,), hq=2, hkv=1, L=65, S=80, E=192, Ev=160, mask="float",
                  mask_shape=(1, 2, 65, 80)),
             # an odd S: a score pair's sums not 8-byte aligned, added one by one (the others: one v2 reduction)
             Case("float16", batch=(2,), hq=2, hkv=2, L=40, S=77, E=64, mask="float", mask_shape=(2, 1, 40, 77)),
             Case("bfloat16", batch=(4,), hq=3, hkv=3, L=65, S=128, E=64, mask="float", mask_shape=(1, 3, 65, 128)),
             Case("float16", batch=(2,), hq=8, hkv=2, L=33, S=64, E=128, mask="float", mask_shape=(1, 1, 33, 64))]
    failures = []
    for case in cases:
        pr = harness.build(case, gpu[0], rng)
        for group in (4, 0):
            failures += [f"{case} mask_order_group={group}: {m}" for m in _failures(
                gpu, pr, rng, "tensor_core", tensor_core_mask_grad_sum=True, mask_order_group=group)]
    assert not failures, "\n".join(failures)
    assert not portable
    assert {(2, 1), (2, 2), (4, 3), (4, 1), (1, 1)} <= orders, orders


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_wide_heads_on_the_tensor_core_loops(gpu, rng, dtype, monkeypatch):
    """KernelConfig.tensor_core_head_dim = 256: head dims 160-256 (and E != Ev) on the tensor_core forward and
    backward (column parts: two warps per 16 rows), with causal, masks, dropout and GQA, against the reference;
    no portable kernel runs."""
    from kernels_numba import gradients, tensor_core

    portable = []
    real = gradients.dq_kernel
    monkeypatch.setattr(gradients, "dq_kernel", lambda *a: portable.append(1) or real(*a))
    calls = {"forward": 0, "backward": 0}
    for name in calls:
        def counted(*a, _name=name, _real=getattr(tensor_core, name), **kw):  # (keywords: mask_grad_sum)
            calls[_name] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(tensor_core, name, counted)
    cases = [Case(dtype, batch=(2,), hq=4, hkv=2, L=130, S=150, E=E, Ev=Ev, causal=causal, mask=mask, dropout_p=p)
             for E, Ev, causal, mask, p in ((160, 160, "upper_left", None, 0.0), (192, 128, None, "bool", 0.0),
                                            (224, 224, None, None, 0.0), (256, 256, "lower_right", None, 0.2),
                                            (200, 256, None, "float", 0.0))]
    failures = []
    for case in cases:
        pr = harness.build(case, gpu[0], rng)
        failures += [f"{case}: {m}" for m in _failures(gpu, pr, rng, "tensor_core", tensor_core_head_dim=256)]
    assert not failures, "\n".join(failures)
    assert calls["forward"] >= len(cases) and calls["backward"] >= len(cases) and not portable


@pytest.mark.parametrize("fused_head_dim", [0, 128])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_fused_backward(gpu, rng, dtype, fused_head_dim, monkeypatch):
    """KernelConfig.fused_backward_head_dim: one kernel per key block, dQ through the fp32 accumulator with
    atomics (128: at every head dim it takes, fp32's column parts at 128 among them), judged as the two kernels are
    (0: also at the head dims the default fuses), with causal both ways, a window, GQA, dropout, a bool mask and
    varlen; a float mask's gradient keeps the dq kernel."""
    from kernels_numba import dq_accumulate

    converts = []
    real = dq_accumulate.convert_kernel
    monkeypatch.setattr(dq_accumulate, "convert_kernel", lambda bf16: converts.append(1) or real(bf16))
    cases = [Case(dtype, batch=(2,), hq=4, hkv=2, L=97, S=130, E=E, causal="upper_left") for E in (32, 64, 96, 128)]
    cases += [Case(dtype, batch=(1, 2), hq=6, hkv=2, L=200, S=70, E=72, Ev=64, causal="lower_right"),
              Case(dtype, batch=(2,), hq=2, hkv=1, L=150, S=150, E=64, window=(40, 7), dropout_p=0.2),
              Case(dtype, batch=(2,), hq=4, hkv=4, L=130, S=97, E=128, mask="bool"),
              Case(dtype, hq=4, hkv=2, E=64, varlen=((70, 64), (0, 9), (129, 200), (5, 0)), causal="lower_right")]
    failures = []
    for case in cases:
        failures += [f"{case}: {m}" for m in _failures(gpu, harness.build(case, gpu[0], rng), rng, "tensor_core",
                                                      fused_backward_head_dim=fused_head_dim)]
    assert not failures, "\n".join(failures)
    assert len(converts) >= len(cases) if fused_head_dim else not converts  # every case's backward fused, or none


def test_fused_fp32_backward_on_column_parts_with_and_without_shared_scores(gpu, rng):
    """fp32 past head dim 96 fused (the default): column parts, the pair's dS^T written once (shared scores: each
    warp its half of the tiles; without: part 0), judged with causal, GQA, dropout and a bool mask."""
    cases = [Case("float32", batch=(2,), hq=4, hkv=2, L=97, S=130, E=128, causal="lower_right", dropout_p=0.1),
             Case("float32", batch=(2,), hq=2, hkv=2, L=130, S=97, E=112, Ev=128, mask="bool")]
    failures = []
    for shared in (True, False):
        for case in cases:
            failures += [f"{case} shared={shared}: {m}" for m in _failures(
                gpu, harness.build(case, gpu[0], rng), rng, "tensor_core", tensor_core_shared_scores=shared)]
    assert not failures, "\n".join(failures)


def test_fused_backward_plan_replays(gpu, rng, monkeypatch):
    """A repeated cusdpa.attention_vjp with the fused backward (the default at head dim 64) replays a plan whose
    workspace is the dQ accumulator; the gradients of every run, planned or not, pass the judge (their bits differ
    with the atomics' order of adds)."""
    cp = gpu[0]
    import cusdpa
    from cusdpa.backends import plans

    q, k, v, dout = (cp.asarray(harness.draw(rng, (2, 4, 150, 64), "bfloat16")) for _ in range(4))
    plans._plans.clear()
    runs = []
    with cusdpa.sdpa_kernel([cusdpa.Backend.EFFICIENT]):
        for _ in range(3):
            out, vjp = cusdpa.attention_vjp(q, k, v, is_causal=True)
            runs.append(vjp(dout))
        (plan,) = plans._plans.values()
        assert plan is not None and plan.backward and plan.dq_accum_elements == 2 * 4 * 150 * 64
        monkeypatch.setattr(plans, "lookup", lambda signature, make: None)
        out, vjp = cusdpa.attention_vjp(q, k, v, is_causal=True)
        runs.append(vjp(dout))  # the general path's
    expected = harness.expect(problem.from_dense(q, k, v, None, problem.Options(is_causal=True)), dout)
    for n, grads in enumerate(runs):
        _, failures = harness.judged(expected, dict(zip(("dq", "dk", "dv"), grads)))
        assert not failures, f"run {n}: " + "\n".join(failures)


def test_fp32_with_tf32_allowed_takes_one_tf32_product(gpu, rng, monkeypatch):
    """Options.allow_tf32 on fp32 inputs: the tensor_core loops' "tf32" family (one TF32 product per tile
    product), judged against PyTorch computing with TF32 matmuls (the yardstick's precision for such a
    problem); without it the same problems take the three-product "float32" family."""
    import dataclasses

    from kernels_numba import tensor_core

    families = []
    real = tensor_core.elem_of
    monkeypatch.setattr(tensor_core, "elem_of", lambda pr: families.append(real(pr)) or families[-1])
    cases = [Case("float32", batch=(2,), hq=4, hkv=2, L=97, S=130, E=64, causal="upper_left"),
             Case("float32", batch=(2,), hq=2, hkv=2, L=130, S=70, E=96, Ev=64, dropout_p=0.2, mask="bool"),
             Case("float32", batch=(1,), hq=2, hkv=1, L=64, S=200, E=128, causal="lower_right")]
    failures = []
    for case in cases:
        pr = dataclasses.replace(harness.build(case, gpu[0], rng), allow_tf32=True)
        failures += [f"{case}: {m}" for m in _failures(gpu, pr, rng, "tensor_core")]
    assert not failures, "\n".join(failures)
    assert families and set(families) == {"tf32"}


@pytest.mark.parametrize("block_n", [32, 64])
def test_forward_keys_per_tile(gpu, rng, block_n):
    """KernelConfig.tensor_core_block_n: the forward with 32- or 64-key tiles (where they fit), judged."""
    cases = [Case("bfloat16", batch=(2,), hq=4, hkv=2, L=97, S=130, E=128, causal="upper_left"),
             Case("float16", batch=(2,), hq=2, hkv=2, L=130, S=70, E=64, mask="bool", dropout_p=0.1),
             Case("float32", batch=(1,), hq=2, hkv=1, L=64, S=100, E=64, causal="lower_right")]
    failures = []
    for case in cases:
        failures += [f"{case}: {m}" for m in _failures(gpu, harness.build(case, gpu[0], rng), rng, "tensor_core",
                                                      tensor_core_block_n=block_n)]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("E", [64, 128])
@pytest.mark.parametrize("allow_tf32", [False, True])
def test_fp32_rows_seeing_one_key_have_no_score_gradient(gpu, rng, allow_tf32, E):
    """fp32 on the tensor_core loops: with one visible key a row's softmax is constant, so dq and dk are exactly
    0, as autograd's softmax gives (fp32's floor leaves no room for rounding noise where the yardstick's error
    is 0): D is computed on dP's own fragments and split, and the dk/dv kernel orders its split products as
    the dq kernel does; at E = 128 with the backward's column parts."""
    cp, _, kn = gpu
    import cusdpa
    from cusdpa import Backend

    q, k, v = (cp.asarray(rng.standard_normal(shape).astype(np.float32))
               for shape in ((2, 2, 150, E), (2, 2, 1, E), (2, 2, 1, E)))
    dout = cp.asarray(rng.standard_normal((2, 2, 150, E)).astype(np.float32))
    with kn.configured(kn.KernelConfig(variant="tensor_core", tensor_core_fp32=True)), \
            cusdpa.sdpa_kernel([Backend.EFFICIENT]):
        out, vjp = cusdpa.attention_vjp(q, k, v, allow_tf32=allow_tf32)
        dq, dk, dv = vjp(dout)
    assert not cp.any(dq != 0) and not cp.any(dk != 0)
    tolerance = 2e-2 if allow_tf32 else 1e-4  # TF32 rounds dO to 10 bits of mantissa in dV = P^T dO
    assert cp.allclose(dv, dout.sum(axis=2, keepdims=True), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("E", [64, 128])
def test_fp32_within_a_few_times_pytorch_s_fp32_error_without_the_floor(gpu, rng, E):
    """fp32 on the tensor_core loops: out and the gradients within 4x PyTorch's fp32 error (the yardstick), the
    rule's floor left out, on short key counts where the tensor cores' truncating additions weigh most. Every
    tile product takes each k-step's three TF32 terms into a zeroed fragment and adds it by FADD (1.3-1.6x in
    benchmarks/tf32_error_model.py); the score products' terms chained in one accumulator gave dq 7-11x there,
    hidden by the floor. Causal, GQA and dropout as in the judged tests; at E = 128 on column parts."""
    from cusdpa.backends import efficient

    kn = gpu[2]
    ratios = []
    for causal, p in ((None, 0.0), ("lower_right", 0.1)):
        pr = harness.build(Case("float32", batch=(2,), hq=4, hkv=2, L=97, S=130, E=E, causal=causal, dropout_p=p),
                           gpu[0], rng)
        dout = pr.xp.asarray(harness.draw(rng, pr.out_shape, "float32"))
        with kn.configured(kn.KernelConfig(variant="tensor_core", tensor_core_fp32=True)):
            out, lse = efficient.IMPL.forward(pr)
            grads = efficient.IMPL.backward(pr, out, lse, dout, False, tuple(pr.xp.empty_like(x)
                                                                           for x in (pr.q, pr.k, pr.v)))
        expected = harness.expect(pr, dout)
        errors, _ = harness.judged(expected, dict(zip(("out", "dq", "dk", "dv"), (out, *grads))))
        ratios += [(f"causal={causal} {name}", errors[name] / expected.bounds[name].yardstick_error)
                   for name in errors if expected.bounds[name].yardstick_error > 0]
    assert all(r <= 4 for _, r in ratios), [(name, round(r, 2)) for name, r in ratios]


# the two on-by-default knobs below, off: what each is judged against
OFF = {"tensor_core_fp32_fast_split": False, "tensor_core_shared_scores": False}


def test_fp32_fast_split_keeps_the_bits(gpu, rng):
    """KernelConfig.tensor_core_fp32_fast_split: the fp32 loops split the elements of tiles that landed finite in 4
    instructions and the others in full: out, lse and the gradients are those with it off bit for bit, with finite
    inputs (causal, a bool mask, GQA, dropout, a window, column parts at head dim 128, E != Ev) and with an inf in
    a K row and a V row that queries see, an inf in a V row none sees and a NaN in a query row; and judged."""
    cases = [Case("float32", batch=(2,), hq=4, hkv=2, L=97, S=130, E=64, causal="lower_right", mask="bool"),
             Case("float32", batch=(1,), hq=2, hkv=1, L=70, S=90, E=128, dropout_p=0.1),
             Case("float32", batch=(2,), hq=2, hkv=2, L=50, S=64, E=96, Ev=72, window=(10, 3))]
    failures = []
    for case in cases:
        pr = harness.build(case, gpu[0], rng)
        failures += [f"{case}: {m}" for m in _failures(gpu, pr, rng, "tensor_core", tensor_core_fp32_fast_split=True)]
        failures += [f"{case}: {m}" for m in _same_bits(gpu, pr, rng, OFF, tensor_core_fp32_fast_split=True)]
    case = Case("float32", batch=(1,), hq=2, hkv=2, L=40, S=70, E=64, causal="upper_left")
    pr = harness.build(case, gpu[0], rng)
    pr.k[0, 0, 5, 3] = np.inf  # seen by rows 5 and on (upper-left causal)
    pr.v[0, 1, 9, 7] = -np.inf
    pr.v[0, 0, 60, 2] = np.inf  # key 60: no row of 40 sees it
    pr.q[0, 1, 12, 0] = np.nan
    failures += [f"non-finite inputs: {m}" for m in _same_bits(gpu, pr, rng, OFF, tensor_core_fp32_fast_split=True)]
    assert not failures, "\n".join(failures)


def test_shared_scores_keep_the_bits(gpu, rng):
    """KernelConfig.tensor_core_shared_scores: where the backward takes column parts (fp32 at head dim 128, bf16
    at 192) the pair of warps splits S and dP (dk/dv: S^T and dP^T) and trades them and dS through shared memory:
    out, lse and the gradients (a float mask's with one element per score too) are those with it off bit for bit, with
    causal, GQA, dropout, a bool mask and a float mask, mask tiles on and off, the fast split; and judged."""
    wide = {"tensor_core_head_dim": 256}
    cases = [(Case("float32", batch=(2,), hq=4, hkv=2, L=97, S=130, E=128, causal="lower_right", mask="bool"),
              {"tensor_core_mask_tiles": False}),
             (Case("float32", batch=(1,), hq=2, hkv=1, L=70, S=90, E=128, Ev=112, dropout_p=0.1),
              {"tensor_core_fp32_fast_split": True}),
             (Case("float32", batch=(2,), hq=4, hkv=2, L=50, S=76, E=128, mask="float", mask_shape=(2, 4, 50, 76)),
              {"tensor_core_mask_tiles": True}),
             (Case("bfloat16", batch=(2,), hq=4, hkv=2, L=130, S=150, E=192, causal="upper_left", dropout_p=0.2),
              wide),
             (Case("bfloat16", batch=(2,), hq=4, hkv=2, L=97, S=128, E=192, mask="bool"),
              {**wide, "tensor_core_mask_tiles": True}),
             (Case("bfloat16", batch=(2,), hq=2, hkv=1, L=70, S=96, E=192, Ev=160, mask="float",
                   mask_shape=(2, 2, 70, 96), dropout_p=0.1), wide)]
    failures = []
    for case, base in cases:
        pr = harness.build(case, gpu[0], rng)
        failures += [f"{case}: {m}" for m in _failures(gpu, pr, rng, "tensor_core", **base,
                                                       tensor_core_shared_scores=True)]
        failures += [f"{case}: {m}" for m in _same_bits(gpu, pr, rng, {**OFF, **base}, tensor_core_shared_scores=True)]
    assert not failures, "\n".join(failures)


def test_dynamic_shared_memory_takes_32_queries_a_step(gpu, rng):
    """KernelConfig.tensor_core_dynamic_smem: the dk/dv loops that 48 KiB of static shared memory held at 16 queries
    a step take 32, their tiles in dynamic shared memory past 48 KiB: the fused backward at head dim 128 (16-bit,
    255 registers), fp32's dk/dv past head dim 64, 16-bit's at 256; judged with causal, GQA, dropout, a bool mask
    with its tiles, a float mask and E != Ev, twice (Numba's launch, which raises the kernel's limit, then the
    prepared one); and a deterministic fp32 attention_vjp on CuPy arrays replayed from its plan, whose launch
    keeps the size, with the same bits."""
    import cusdpa
    from cusdpa import Backend
    from cusdpa.backends import plans

    cp, _, kn = gpu
    fused, wide = {"fused_backward_head_dim": 128}, {"tensor_core_head_dim": 256}
    cases = [(Case("bfloat16", batch=(2,), hq=4, hkv=2, L=130, S=150, E=128, causal="lower_right", dropout_p=0.1),
              fused),
             (Case("float16", batch=(2,), hq=2, hkv=2, L=97, S=128, E=128, mask="bool"),
              {**fused, "tensor_core_mask_tiles": True}),
             (Case("float32", batch=(2,), hq=4, hkv=2, L=97, S=130, E=128, causal="upper_left"), {}),
             (Case("float32", batch=(1,), hq=2, hkv=1, L=70, S=90, E=96, Ev=80, mask="float",
                   mask_shape=(1, 2, 70, 90)), {}),
             (Case("bfloat16", batch=(2,), hq=2, hkv=2, L=80, S=100, E=256, dropout_p=0.2), wide)]
    failures = []
    for case, base in cases:
        pr = harness.build(case, gpu[0], rng)
        for _ in range(2):
            failures += [f"{case}: {m}" for m in _failures(gpu, pr, rng, "tensor_core", **base,
                                                           tensor_core_dynamic_smem=True)]
    assert not failures, "\n".join(failures)
    q, k, v = (cp.asarray(harness.draw(rng, (2, 2, 150, 128), "float32")) for _ in range(3))
    dout = cp.asarray(harness.draw(rng, (2, 2, 150, 128), "float32"))
    plans._plans.clear()
    with kn.configured(kn.KernelConfig(variant="tensor_core", tensor_core_dynamic_smem=True)), \
            cusdpa.sdpa_kernel([Backend.EFFICIENT]):
        runs = []
        for _ in range(3):  # the general path, then a plan recorded and replayed; deterministic: fp32's fused
            # backward (its default here) adds dQ with atomics, whose bits vary; the two kernels' dk/dv loop
            # takes dynamic shared memory too
            out, vjp = cusdpa.attention_vjp(q, k, v, is_causal=True, deterministic=True)
            runs.append((out, *vjp(dout)))
    assert any(x.smem > 48 * 1024 for p in plans._plans.values() if p is not None for x in p.backward
               if hasattr(x, "smem")), "no plan launched a loop with dynamic shared memory"
    for got in runs[1:]:
        for g, w in zip(got, runs[0]):
            assert cp.array_equal(g, w)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_mask_tiles(gpu, rng, dtype):
    """KernelConfig.tensor_core_mask_tiles: the attn_mask elements staged in shared memory with each tile (forward,
    dq, dk/dv, the fused backward), judged for every mask kind (float64's tiles fit only beside fp32's narrow
    ones), broadcast rows and heads, GQA, partial tiles, with causal and dropout; and masks the loops must read
    element by element (rows not 16-byte aligned, keys broadcast)."""
    cases = [Case(dtype, batch=(2,), hq=2, hkv=2, L=130, S=96, E=64, mask="bool", causal="lower_right"),
             Case(dtype, batch=(2,), hq=4, hkv=2, L=70, S=160, E=128, mask="float", mask_shape=(4, 70, 160)),
             Case(dtype, batch=(2,), hq=2, hkv=1, L=65, S=128, E=64, mask="float", mask_dtype="bfloat16",
                  mask_shape=(2, 1, 1, 128), dropout_p=0.1),
             Case(dtype, batch=(1,), hq=2, hkv=2, L=40, S=64, E=64, mask="float", mask_dtype="float32"),
             Case(dtype, batch=(1,), hq=2, hkv=2, L=40, S=64, E=64, mask="float", mask_dtype="float64"),
             Case(dtype, batch=(2,), hq=2, hkv=2, L=50, S=70, E=64, mask="bool"),  # rows of 70 bytes
             Case(dtype, batch=(2,), hq=2, hkv=2, L=50, S=64, E=64, mask="float", mask_shape=(50, 1))]  # keys broadcast
    failures = []
    for n, case in enumerate(cases):
        fused = n == 0 and dtype == "float16"  # a bool mask: the fused backward takes it
        pr = harness.build(case, gpu[0], rng)
        failures += [f"{case} fused={fused}: {m}" for m in _failures(gpu, pr, rng, "tensor_core",
                                                                    tensor_core_mask_tiles=True,
                                                                    fused_backward_head_dim=128 if fused else 0)]
        if not fused:  # the same elements, only staged: the same bits as per-element loads
            failures += [f"{case}: {m}" for m in _same_bits(gpu, pr, rng, {"tensor_core_mask_tiles": False},
                                                               tensor_core_mask_tiles=True)]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("knob, kernel", [("tensor_core_dkdv_blocks", "_dkdv_kernel"),
                                          ("tensor_core_dq_blocks", "_dq_kernel")])
def test_backward_blocks_change_the_registers_not_the_bits(gpu, rng, monkeypatch, knob, kernel):
    """KernelConfig.tensor_core_dkdv_blocks and tensor_core_dq_blocks = 2: that 16-bit loop (not fused) at head
    dim 128 at 255 registers, two blocks an SM: the same PTX, so the bits of 0 (tensor_core_blocks' 168), and
    judged; head dims 128 (causal; a bool mask with dropout) and 64 (GQA: the knobs leave it at 168)."""
    from kernels_numba import tensor_core

    caps = set()
    real = getattr(tensor_core, kernel)
    monkeypatch.setattr(tensor_core, kernel, lambda *a: caps.add(a[4]) or real(*a))
    cases = [Case("bfloat16", batch=(2,), hq=4, hkv=2, L=130, S=97, E=128, causal="upper_left"),
             Case("float16", batch=(2,), hq=2, hkv=2, L=70, S=150, E=128, mask="bool", dropout_p=0.1),
             Case("bfloat16", batch=(3,), hq=2, hkv=1, L=65, S=80, E=64)]
    failures = []
    for case in cases:
        pr = harness.build(case, gpu[0], rng)
        failures += [f"{case}: {m}" for m in _failures(gpu, pr, rng, "tensor_core", fused_backward_head_dim=0,
                                                       **{knob: 2})]
        failures += [f"{case}: {m}" for m in _same_bits(gpu, pr, rng, {"fused_backward_head_dim": 0, knob: 0},
                                                         **{knob: 2})]
    assert not failures, "\n".join(failures)
    assert {168, 255} <= caps, caps


def test_head_major_grid(gpu, rng):
    """KernelConfig.head_major_grid (the default, where no causal band or window makes a head's blocks unequal):
    the tensor_core kernels' blocks in head-major order (forward, dq and dk/dv, the fused backward), judged, and
    against heads fastest bit for bit: GQA, a bool mask with dropout, varlen."""
    cases = [Case("bfloat16", batch=(2,), hq=4, hkv=2, L=130, S=97, E=128),
             Case("float16", batch=(3,), hq=2, hkv=2, L=70, S=150, E=64, mask="bool", dropout_p=0.1),
             Case("bfloat16", hq=4, hkv=1, E=64, varlen=((5, 70), (130, 3), (64, 64)))]
    failures = []
    for fused in (False, True):
        for case in cases:
            pr = harness.build(case, gpu[0], rng)
            failures += [f"{case} fused={fused}: {m}" for m in _failures(
                gpu, pr, rng, "tensor_core", head_major_grid=True, fused_backward_head_dim=128 if fused else 0)]
            if not fused:  # each block's work unchanged, only where it runs (the fused dq adds up in arrival order)
                failures += [f"{case}: {m}" for m in _same_bits(gpu, pr, rng, {"head_major_grid": False},
                                                                 head_major_grid=True)]
    assert not failures, "\n".join(failures)
