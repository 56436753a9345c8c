"""EFFICIENT kernels on Numba's CUDA simulator (CPU): every feature, forward and backward, tiny shapes.

Numba reads NUMBA_ENABLE_CUDASIM once, when numba.cuda is first imported, so the simulator cannot be
switched on inside a pytest process that may already hold the real CUDA target (or need it for GPU
tests). The cases therefore run in one child process started with the variable set (this file run
as a script), spread over a pool of worker processes; each pytest test reports its own case's result.
Tiles are tiny (4 to 8 rows) so the tile loops, partial tiles and skipped tiles are all exercised on
shapes the simulator runs quickly.

Every problem goes through the one harness (cusdpa.verify.harness.run_problem): outputs NaN-poisoned
before the kernels write them, then judged by the error rule of cusdpa.verify.judge against the float64
reference (at most 2x, 3x for gradients, the error of PyTorch at the same precision on the CPU, plus a
floor).
"""
import os
import subprocess

import numpy as np
import pytest
import simulator_child

from cusdpa import problem
from cusdpa.backends import efficient
from cusdpa.verify import harness

CASES = {}


def case(fn):
    CASES[fn.__name__.removeprefix("case_")] = fn
    return fn


def _check(rng, q, k, v, mask=None, grad=True, **kw):
    """EFFICIENT on the problem of these arguments, judged by the harness."""
    seed = kw.pop("seed", None)
    pr = problem.from_dense(q, k, v, mask, problem.Options(**kw), seed)
    return harness.run_problem(pr, efficient.IMPL, rng, grad)


def _qkv(rng, batch, hq, hkv, L, S, E, Ev, dtype=np.float32):
    def draw(shape):
        return rng.standard_normal(shape).astype(dtype)

    return draw(batch + (hq, L, E)), draw(batch + (hkv, S, E)), draw(batch + (hkv, S, Ev))


@case
def case_causal_upper_left_odd_sizes(rng):
    return _check(rng, *_qkv(rng, (2,), 2, 2, 13, 19, 8, 5), is_causal=True)


@case
def case_causal_lower_right_both_shapes(rng):
    return (_check(rng, *_qkv(rng, (1,), 2, 2, 7, 18, 4, 4), is_causal=True, causal_variant="lower_right")
            + _check(rng, *_qkv(rng, (1,), 1, 1, 17, 6, 4, 3), is_causal=True, causal_variant="lower_right"))


@case
def case_sliding_window(rng):
    return (_check(rng, *_qkv(rng, (), 2, 2, 15, 15, 4, 4), window=(3, 1))
            + _check(rng, *_qkv(rng, (), 1, 1, 9, 16, 4, 4), is_causal=True, causal_variant="lower_right",
                     window=(2, -1))
            + _check(rng, *_qkv(rng, (), 1, 1, 12, 7, 4, 4), window=(-1, 0)))


@case
def case_gqa_sums_dk_dv_over_the_group(rng):
    return _check(rng, *_qkv(rng, (2,), 4, 2, 9, 11, 8, 8), enable_gqa=True, is_causal=True)


BOOL_MASKS = {"full": (2, 2, 9, 10), "key_padding": (2, 1, 1, 10), "per_head": (2, 9, 10), "2d": (9, 10),
              "key_only": (10,), "query_only": (9, 1)}


@case
def case_bool_masks_every_broadcast_shape(rng):
    failures = []
    for name, shape in BOOL_MASKS.items():
        mask = rng.random(shape) > 0.3
        failures += [f"{name}: {m}" for m in _check(rng, *_qkv(rng, (2,), 2, 2, 9, 10, 4, 4), mask)]
    return failures


@case
def case_float_masks_and_their_gradient(rng):
    failures = []
    for name, shape in {"full": (2, 2, 7, 6), "2d": (7, 6), "key_only": (6,), "per_head": (2, 7, 6),
                        "query_only": (7, 1)}.items():
        mask = rng.standard_normal(shape).astype(np.float32)
        mask = np.where(rng.random(shape) < 0.15, -np.inf, mask).astype(np.float32)
        failures += [f"{name}: {m}" for m in _check(rng, *_qkv(rng, (2,), 2, 2, 7, 6, 4, 4), mask)]
    return failures


@case
def case_float_mask_of_another_dtype_with_gqa(rng):
    mask = rng.standard_normal((4, 5, 6)).astype(np.float16)
    return _check(rng, *_qkv(rng, (1,), 4, 2, 5, 6, 4, 4), mask, enable_gqa=True, is_causal=True,
                  causal_variant="lower_right")


@case
def case_fp16_and_bf16(rng):
    import ml_dtypes

    failures = []
    for dtype in (np.float16, ml_dtypes.bfloat16):
        mask = (rng.standard_normal((6, 9)) * 2).astype(dtype)
        failures += [f"{np.dtype(dtype).name}: {m}"
                     for m in _check(rng, *_qkv(rng, (1,), 2, 1, 6, 9, 8, 4, dtype), mask, enable_gqa=True)]
    return failures


@case
def case_dropout_mask_bit_identical_to_philox(rng):
    """q = 0 makes P uniform (1/S); v = identity makes out[i, j] = P_ij * keep_ij / (1 - p)."""
    from cusdpa import philox

    hq, L, S, p, seed, offset = 3, 5, 11, 0.4, (7 << 32) | 12345, 3
    q = np.zeros((2, hq, L, 4), np.float32)
    k = rng.standard_normal((2, hq, S, 4)).astype(np.float32)
    v = np.broadcast_to(np.eye(S, dtype=np.float32), (2, hq, S, S))
    pr = problem.from_dense(q, k, v, None, problem.Options(dropout_p=p), (seed, offset))
    out, _ = efficient.IMPL.forward(pr)
    want = philox.keep_mask(seed, offset, np.arange(2 * hq).reshape(2, hq), L, S, p)
    failures = [] if np.array_equal(out != 0, want) else [
        f"keep-mask differs from cusdpa.philox at {int((want != (out != 0)).sum())} of {want.size} elements"]
    kept = out[want]
    if not np.allclose(kept, 1 / (S * (1 - p)), rtol=1e-6):
        failures.append(f"kept values {kept[:4]} are not 1/(S(1-p)) = {1 / (S * (1 - p))}")
    return failures


@case
def case_dropout_forward_backward(rng):
    q, k, v = _qkv(rng, (2,), 2, 1, 7, 10, 4, 4)
    mask = rng.standard_normal((7, 10)).astype(np.float32)
    return (_check(rng, q, k, v, mask, dropout_p=0.3, seed=99, enable_gqa=True, is_causal=True)
            + _check(rng, q, k, v, dropout_p=1.0, seed=5, enable_gqa=True))


@case
def case_varlen(rng):
    failures = []
    lens_q, lens_k = [5, 0, 9, 3], [7, 4, 6, 0]
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    for kw in (dict(is_causal=True), dict(is_causal=True, causal_variant="lower_right", window=(2, 1)),
               dict(dropout_p=0.25, seed=11)):
        q = rng.standard_normal((cu_q[-1], 4, 4)).astype(np.float32)
        k = rng.standard_normal((cu_k[-1], 2, 4)).astype(np.float32)
        v = rng.standard_normal((cu_k[-1], 2, 3)).astype(np.float32)
        seed = kw.pop("seed", None)
        pr = problem.from_varlen(q, k, v, cu_q, cu_k, 9, 8, problem.Options(enable_gqa=True, **kw), seed)
        failures += [f"{kw}: {m}" for m in harness.run_problem(pr, efficient.IMPL, rng)]
    return failures


@case
def case_strided_and_broadcast_inputs(rng):
    base = rng.standard_normal((3, 2, 9, 2, 12)).astype(np.float32)
    q = base.transpose(1, 3, 2, 0, 4)[..., :8]  # (2, 2, 9, 3, 8): head dim strided, batch dims permuted
    q = q.transpose(0, 3, 1, 2, 4)  # (2, 3, 2, 9, 8)
    k = rng.standard_normal((1, 3, 2, 20, 8)).astype(np.float32)[:, :, :, ::2]  # (1, 3, 2, 10, 8), broadcast
    v = rng.standard_normal((2, 1, 2, 10, 5)).astype(np.float32)[:, :, ::-1]  # negative row stride
    mask = rng.random((3, 1, 9, 10)) > 0.2
    return _check(rng, q, k, v, mask, is_causal=True)


@case
def case_rank2_inputs_and_broadcast_query(rng):
    q = rng.standard_normal((6, 4)).astype(np.float32)
    k, v = (rng.standard_normal((2, 1, 8, d)).astype(np.float32) for d in (4, 3))
    return _check(rng, q, k, v, window=(2, 2))


@case
def case_four_batch_dims_merge(rng):
    q, k, v = _qkv(rng, (2, 1, 2, 2), 1, 1, 5, 6, 4, 4)
    mask = rng.standard_normal((2, 1, 1, 1, 1, 5, 6)).astype(np.float32)
    return _check(rng, q, k, v, mask)


@case
def case_fully_masked_rows(rng):
    q, k, v = _qkv(rng, (1,), 2, 2, 6, 9, 4, 4)
    mask = rng.random((1, 2, 6, 9)) > 0.4
    mask[0, 0, 2] = False
    mask[0, 1, 5] = False
    fmask = np.where(mask, 0.5, -np.inf).astype(np.float32)
    return _check(rng, q, k, v, mask) + _check(rng, q, k, v, fmask)


@case
def case_nan_padding_does_not_leak(rng):
    q, k, v = _qkv(rng, (2,), 2, 2, 8, 12, 4, 4)
    keys = np.ones((2, 1, 1, 12), bool)
    keys[0, ..., 9:] = False
    keys[1, ..., 4:6] = False
    rows = np.ones((2, 1, 8, 1), bool)
    rows[1, :, 6:] = False
    k[0, :, 9:] = np.nan
    v[0, :, 9:] = np.inf
    k[1, :, 4:6] = np.nan
    v[1, :, 4:6] = np.nan
    q[1, :, 6:] = np.nan
    return _check(rng, q, k, v, keys & rows)


@case
def case_float_mask_without_its_gradient(rng):
    """Three gradient arrays (the torch op's call when the mask requires no gradient): dq, dk, dv as with the
    mask's gradient, and no fourth array asked for."""
    from cusdpa import reference

    q, k, v = _qkv(rng, (1,), 2, 2, 7, 9, 4, 4)
    mask = rng.standard_normal((2, 7, 9)).astype(np.float32)
    pr = problem.from_dense(q, k, v, mask, problem.Options(is_causal=True), None)
    out, lse = efficient.IMPL.forward(pr)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    grads = tuple(np.full(x.shape, np.nan, np.float32) for x in (q, k, v))
    got = efficient.IMPL.backward(pr, out, lse, dout, False, grads)
    want = reference.attention_grads(q, k, v, dout, mask, is_causal=True)
    failures = [] if len(got) == 3 else [f"{len(got)} results for three arrays"]
    return failures + [f"{name} differs from the reference" for name, g, w in zip(("dq", "dk", "dv"), got, want)
                       if not np.allclose(g, w, atol=1e-4)]


@case
def case_empty_sequences(rng):
    failures = []
    for L, S in ((0, 5), (4, 0)):
        failures += [f"L={L} S={S}: {m}" for m in _check(rng, *_qkv(rng, (2,), 2, 2, L, S, 4, 4), is_causal=True)]
    return failures


@case
def case_backward_tiles_of_other_shapes(rng):
    """4 x 4 pieces per thread (4 keys share one Philox call), gradient products streamed in 2-row
    slices, and a head dim over 128 (the dk/dv kernel halves its keys per thread)."""
    from kernels_numba import KernelConfig, configured

    with configured(KernelConfig(variant="portable", threads=2, sub=4,
                                 chunk=2)):
        mask = rng.standard_normal((11, 13)).astype(np.float32)
        return (_check(rng, *_qkv(rng, (1,), 2, 1, 11, 13, 8, 6), mask, dropout_p=0.3, seed=7, enable_gqa=True,
                       is_causal=True)
                + _check(rng, *_qkv(rng, (), 1, 1, 5, 6, 136, 130), window=(2, 1)))


@case
def case_fp32_dp_where_dp_minus_delta_cancels(rng):
    """The draws on which fp32 sums of dP failed (the second problem above, E = 136: a row with P 0.93 on one key
    and |dP| ~ 30 there, so dS = P (dP - delta) cancels and dP's rounding, which delta from out does not share, is
    left): dk 5.6e-6 and dq 4.1e-6 against bounds of 3.7e-6 and 3.6e-6. Fixed draws, not this run's: dP and delta
    are now summed in fp64 for fp32 inputs (Spec.wide; 3.0e-7 and 3.3e-7 on them)."""
    import zlib

    return case_backward_tiles_of_other_shapes(
        np.random.default_rng([2535802345, zlib.crc32(b"backward_tiles_of_other_shapes")]))


@case
def case_tiles_of_three_rows_a_thread(rng):
    """sub = 3: blocks of 6 rows, so the products' staged slices (a power of two) must divide 6, not run past
    the tile into the next one's rows."""
    from kernels_numba import KernelConfig, configured

    with configured(KernelConfig(variant="portable", threads=2, sub=3, chunk=4)):
        return _check(rng, *_qkv(rng, (2,), 2, 2, 13, 11, 8, 8), rng.random((13, 11)) > 0.3, dropout_p=0.2, seed=3,
                      is_causal=True)


@case
def case_fused_backward_passes(rng):
    """The passes around the fused tensor_core backward (kernels_numba.dq_accumulate), on 6-D views with a padded
    accumulator: D = rowsum(dout * out) in fp32 and the accumulator zeroed before; dq = scale * accumulator
    rounded to fp16 or to bf16's bits (round to nearest even) after. Rows of 7 columns (8 threads a row, 16 rows a
    block) and of 200 (32 threads a row looping over them), 30 rows: the last block runs partly past them."""
    from kernels_numba import dq_accumulate

    failures = []
    for cols, padded in ((7, 8), (200, 208)):
        shape = (2, 1, 1, 3, 5, cols)
        for bf16 in (False, True):
            out32, dout32 = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
            if bf16:  # bf16 values and their bits
                out32, dout32 = ((x.view(np.uint32) & 0xFFFF0000).view(np.float32) for x in (out32, dout32))
                out, dout = ((x.view(np.uint32) >> 16).astype(np.uint16) for x in (out32, dout32))
            else:
                out, dout = out32.astype(np.float16), dout32.astype(np.float16)
                out32, dout32 = out.astype(np.float32), dout.astype(np.float32)
            delta = np.full(shape[:5], np.nan, np.float32)
            accum = np.full(shape[:5] + (padded,), np.nan, np.float32)
            grid, per_row = dq_accumulate.launch_shape(accum)
            dq_accumulate.prepare_kernel(bf16)[grid, dq_accumulate.THREADS](out, dout, delta, accum, per_row)
            want = (out32.astype(np.float64) * dout32).sum(-1)
            if not np.allclose(delta, want, rtol=1e-5, atol=1e-5):
                failures.append(f"{cols=} bf16={bf16}: D off by {np.nanmax(np.abs(delta - want)):.3g}")
            if np.any(accum != 0):
                failures.append(f"{cols=} bf16={bf16}: the accumulator was not zeroed")
            accum[...] = rng.standard_normal(accum.shape)
            dq = np.zeros(shape, np.uint16 if bf16 else np.float16)
            dq_accumulate.convert_kernel(bf16)[grid, dq_accumulate.THREADS](accum, dq, 0.125, per_row)
            scaled = accum[..., :cols] * np.float32(0.125)
            if bf16:
                bits = scaled.view(np.uint32).astype(np.uint64)
                expect = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            else:
                expect = scaled.astype(np.float16)
            if not np.array_equal(dq, expect):
                failures.append(f"{cols=} bf16={bf16}: dq differs from scale * accumulator at "
                                f"{np.argwhere(dq != expect)[:3]}")
    return failures


@case
def case_tensor_core_block_orders(rng):
    """The tensor_core kernels' block -> (slice, first row) map (tensor_core._block_of) over the grid of
    tensor_core._grid, both orders: every row block of every slice once, the heaviest first (descending
    query blocks, ascending key blocks); head-major: one slice's blocks consecutive, or with a group of n slices
    stride apart (tensor_core.grid_order), the group's n slices side by side on each row block."""
    global cuda  # a module global: the simulator swaps such a name for its own module inside a kernel
    from numba import cuda

    from kernels_numba import tensor_core

    failures = []
    slices, extent = 12, 10
    orders = [(False, 1, 1)] + [(True, n, stride) for n, stride in ((1, 1), (2, 3), (4, 1), (3, 4))]
    for head_major, n, stride in orders:
        for rows in (-4, 4):  # query blocks (the last first) and key blocks (the first first)
            grid = tensor_core._grid(slices, abs(rows), extent, head_major)
            name = f"head_major={head_major} order=({n}, {stride}) rows={rows}"

            @cuda.jit
            def record(out, head_major=head_major, rows=rows, extent=extent, n=n, stride=stride):
                slice_, first = tensor_core._block_of(head_major, rows, extent, cuda.blockIdx.x, cuda.blockIdx.y,
                                                      cuda.gridDim.y, n, stride)
                at = cuda.blockIdx.x + cuda.gridDim.x * cuda.blockIdx.y
                out[at, 0] = slice_
                out[at, 1] = first

            got = np.full((grid[0] * grid[1], 2), -1, np.int64)
            record[grid, 1](got)
            seen = sorted(map(tuple, got))
            want = sorted((sl, r) for sl in range(slices) for r in range(0, extent, abs(rows)))
            if seen != want:
                failures.append(f"{name}: blocks {seen}, want {want}")
            order = [tuple(x) for x in got]  # in launch order (x fastest)
            per_slice = [[r for sl, r in order if sl == s] for s in range(slices)]
            if any(p != sorted(p, reverse=rows < 0) for p in per_slice):
                failures.append(f"{name}: not heaviest first: {per_slice}")
            if not head_major:
                continue
            for at in range(0, len(order), n):  # each run of n launches: one group's slices on one row block
                run = order[at:at + n]
                base = run[0][0]
                if [sl for sl, _ in run] != [base + j * stride for j in range(n)] or len({r for _, r in run}) != 1:
                    failures.append(f"{name}: launches {at}..{at + n - 1} are {run}, not a group on one block")
                    break
    return failures


@case
def case_rows_seeing_one_key_have_no_score_gradient(rng):
    """With one visible key a row's softmax is constant, so dq and dk are exactly 0, as autograd's softmax
    gives; delta from the output must then equal dP bit for bit (summed in dP's order), or rounding noise
    ~1e-6 fails fp32's floor where the yardstick's error is 0 (L = 1025, S = 1 on the GPU)."""
    import cusdpa
    from cusdpa import Backend

    q, k, v = _qkv(rng, (2,), 2, 2, 9, 1, 8, 8)
    with cusdpa.sdpa_kernel([Backend.EFFICIENT]):
        out, vjp = cusdpa.attention_vjp(q, k, v)
        dq, dk, dv = vjp(rng.standard_normal(out.shape).astype(np.float32))[:3]
    return [f"{name} is not exactly 0: max {np.abs(g).max():.3g}" for name, g in (("dq", dq), ("dk", dk))
            if np.any(g != 0)]


@case
def case_public_api_dispatch_under_the_simulator(rng):
    import cusdpa
    from cusdpa import Backend, reference

    q, k, v = _qkv(rng, (1,), 2, 2, 5, 7, 4, 4)
    failures = []
    if cusdpa.explain(q, k, v).chosen is not Backend.MATH:
        failures.append("MATH must stay the default on NumPy arrays with the simulator on")
    with cusdpa.sdpa_kernel([Backend.EFFICIENT]):
        if cusdpa.explain(q, k, v).chosen is not Backend.EFFICIENT:
            failures.append(f"EFFICIENT not chosen when selected: {cusdpa.explain(q, k, v)}")
        out, vjp = cusdpa.attention_vjp(q, k, v, is_causal=True)
        dq = vjp(np.ones_like(out))[0]
    want = reference.attention(q, k, v, is_causal=True)[0]
    want_dq = reference.attention_grads(q, k, v, np.ones_like(out), is_causal=True)[0]
    if not (np.allclose(out, want, atol=1e-5) and np.allclose(dq, want_dq, atol=1e-5)):
        failures.append("public API under sdpa_kernel([EFFICIENT]) disagrees with the reference")
    return failures


def _run_case(name_seed):
    import zlib

    name, seed = name_seed
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    from kernels_numba import configured

    from cusdpa.verify.check import simulator_tiles

    with configured(simulator_tiles()):
        return name, CASES[name](rng)


@pytest.mark.parametrize("name", list(CASES))
def test_on_the_simulator(name, simulator_results):
    simulator_child.assert_passed(simulator_results, name)


def test_numpy_arrays_need_the_simulator_and_an_explicit_choice(rng):
    """In this (non-simulator) process EFFICIENT declines NumPy arrays with a reason that says how."""
    import cusdpa
    from cusdpa import Backend

    q, k, v = _qkv(rng, (1,), 1, 1, 3, 3, 4, 4)
    with cusdpa.sdpa_kernel([Backend.EFFICIENT]):
        reasons = cusdpa.explain(q, k, v).reasons[Backend.EFFICIENT]
    from cusdpa import environment

    if environment.simulator_enabled():
        pytest.skip("this pytest process itself runs with NUMBA_ENABLE_CUDASIM=1")
    assert any("NUMBA_ENABLE_CUDASIM=1" in r for r in reasons), reasons


def _route(monkeypatch, rng, shapes, mask_shape, dtype, fused_head_dim=0, deterministic=False, dynamic_smem=True,
           mask_grad_sum=None):
    """Where attention.backward sends a problem with the tensor_core variant chosen, without a GPU (launches
    recorded, not issued): "tensor_core" (" fused" with a dQ accumulator, " sums" adding a float mask's gradient
    into fp32 sums), or the portable dq kernel's delta. ``mask_grad_sum`` None: KernelConfig's default."""
    from cusdpa import environment

    if environment.simulator_enabled():
        pytest.skip("this pytest process runs with NUMBA_ENABLE_CUDASIM=1")
    from kernels_numba import KernelConfig, attention, configured, gradients, layout, tensor_core

    routes = []
    monkeypatch.setattr(layout, "device_of", lambda x: 0)
    monkeypatch.setattr(attention, "variant_for", lambda pr, cfg: "tensor_core")
    monkeypatch.setattr(attention.launcher, "launch", lambda *a: None)
    monkeypatch.setattr(tensor_core, "backward", lambda *a, **kw: routes.append(
        "tensor_core" + (" fused" if a[7] is not None else "") + (" sums" if kw.get("mask_grad_sum") else "")))
    real = gradients.dq_kernel
    monkeypatch.setattr(gradients, "dq_kernel", lambda spec, direct, from_out: routes.append(
        "portable from out" if from_out else "portable from P dP") or real(spec, direct, from_out))
    (q_shape, k_shape) = shapes
    q = rng.standard_normal(q_shape).astype(dtype)
    k, v = (rng.standard_normal(k_shape).astype(dtype) for _ in range(2))
    mask = None if mask_shape is None else rng.standard_normal(mask_shape).astype(np.float32)
    pr = problem.from_dense(q, k, v, mask, problem.Options(enable_gqa=True))
    out = np.zeros(pr.out_shape, dtype)
    lse = np.zeros(pr.lse_shape, np.float32)
    sums = {} if mask_grad_sum is None else {"tensor_core_mask_grad_sum": mask_grad_sum}
    with configured(KernelConfig(fused_backward_head_dim=fused_head_dim, tensor_core_dynamic_smem=dynamic_smem,
                                 **sums)):
        attention.backward(pr, out, lse, out, deterministic=deterministic)
    return routes


@pytest.mark.parametrize("shapes, mask_shape, dtype, expect", [
    (((2, 4, 9, 8), (2, 2, 11, 8)), None, np.float16, "tensor_core"),
    (((2, 4, 9, 8), (2, 2, 11, 8)), (2, 4, 9, 11), np.float16, "tensor_core"),  # dmask: one element a score
    (((1, 4, 9, 8), (2, 2, 11, 8)), None, np.float16, "portable from out"),  # dq sums over two batch elements
    (((2, 4, 9, 8), (2, 2, 11, 8)), (9, 1), np.float16, "portable from P dP"),  # a broadcast float mask's gradient
    (((2, 4, 9, 160), (2, 2, 11, 160)), None, np.float16, "tensor_core"),  # column parts past 128
    (((2, 4, 9, 96), (2, 2, 11, 96)), None, np.float32, "tensor_core"),
    (((2, 4, 9, 128), (2, 2, 11, 128)), None, np.float32, "tensor_core"),  # fp32: column parts past 96
])
def test_backward_routes_to_the_variant_and_delta_that_serve_it(shapes, mask_shape, dtype, expect, monkeypatch, rng):
    """Its own kernels where they apply; else the portable ones, with delta = rowsum(dout * out) unless a
    broadcast float mask's gradient needs it summed from P and dP."""
    assert _route(monkeypatch, rng, shapes, mask_shape, dtype) == [expect]


@pytest.mark.parametrize("E, mask_shape, dtype, deterministic, fused_head_dim, expect", [
    (8, None, np.float16, False, 64, "tensor_core fused"),  # the default: up to head dim 64
    (64, None, np.float16, False, 64, "tensor_core fused"),
    (72, None, np.float16, False, 64, "tensor_core"),  # padded to 96
    (72, None, np.float16, False, 96, "tensor_core fused"),
    (8, None, np.float16, False, 0, "tensor_core"),  # never
    (8, None, np.float16, True, 64, "tensor_core"),  # atomics vary the bits run to run
    (8, None, np.float32, False, 64, "tensor_core fused"),  # fp32 too, its D from the dq kernel without keys
    (96, None, np.float32, False, 64, "tensor_core fused"),  # fp32 at every head dim of whole rows
    (8, None, np.float32, False, 0, "tensor_core"),  # never
    (8, None, np.float32, True, 64, "tensor_core"),
    (128, None, np.float32, False, 64, "tensor_core fused"),  # and past 96 on column parts
    (8, (2, 4, 9, 11), np.float16, False, 64, "tensor_core"),  # the dq kernel writes a float mask's gradient
])
def test_fused_backward_up_to_its_head_dim_where_nondeterminism_is_allowed(E, mask_shape, dtype, deterministic,
                                                                           fused_head_dim, expect, monkeypatch, rng):
    shapes = ((2, 4, 9, E), (2, 2, 11, E))
    assert _route(monkeypatch, rng, shapes, mask_shape, dtype, fused_head_dim, deterministic) == [expect]


def test_fp32_fuses_on_column_parts_only_in_dynamic_shared_memory(monkeypatch, rng):
    """fp32's fused loop on column parts (head dim 128) takes its 32-query steps from dynamic shared memory."""
    shapes = ((2, 4, 9, 128), (2, 2, 11, 128))
    assert _route(monkeypatch, rng, shapes, None, np.float32, 64, dynamic_smem=False) == ["tensor_core"]
    assert _route(monkeypatch, rng, shapes, None, np.float32, 64) == ["tensor_core fused"]


@pytest.mark.parametrize("mask_shape, deterministic, expect", [
    ((1, 4, 9, 11), False, "tensor_core sums"),  # broadcast over batch: dS added into fp32 sums
    ((2, 1, 9, 11), False, "tensor_core sums"),  # over heads
    ((11,), False, "tensor_core sums"),  # over batch, heads and queries: never summed along a row of dS
    ((1, 4, 9, 11), True, "portable from P dP"),  # atomics vary the bits run to run
    ((9, 1), False, "portable from P dP"),  # over keys: a row's dS cancel to ~0, exact in the portable kernels
])
def test_a_broadcast_float_mask_s_gradient_sums_on_tensor_cores_where_allowed(mask_shape, deterministic, expect,
                                                                                monkeypatch, rng):
    """KernelConfig.tensor_core_mask_grad_sum: a float mask broadcast over batch, heads or queries, not keys, gets its
    gradient from the tensor_core dq kernel's fp32 sums, where the backward may be non-deterministic; off, the
    portable kernels as before."""
    shapes = ((2, 4, 9, 8), (2, 2, 11, 8))
    assert _route(monkeypatch, rng, shapes, mask_shape, np.float16, deterministic=deterministic) == [expect]
    assert _route(monkeypatch, rng, shapes, mask_shape, np.float16, deterministic=deterministic,
                  mask_grad_sum=False) == ["portable from P dP"]


def test_fused_backward_keeps_whole_rows_per_warp(monkeypatch, rng):
    """Past head dim 128 the backward takes column parts, which the fused loop is not written for."""
    shapes = ((2, 4, 9, 160), (2, 2, 11, 160))
    assert _route(monkeypatch, rng, shapes, None, np.float16, fused_head_dim=128) == ["tensor_core"]


@pytest.mark.parametrize("options, major", [
    ({}, True), ({"mask": "bool"}, True), ({"dropout_p": 0.1}, True), ({"varlen": ((5, 7), (9, 3))}, True),
    ({"causal": "upper_left"}, False), ({"causal": "lower_right"}, False), ({"window": (4, 4)}, False),
    ({"window": (-1, 0)}, False)])
def test_the_head_major_grid_only_where_a_head_s_blocks_do_equal_work(options, major, rng):
    """tensor_core.head_major: KernelConfig.head_major_grid (the default) where no causal band or window makes a
    head's blocks unequal; under one, heads fastest, heaviest first; never with the knob off."""
    from kernels_numba import KernelConfig, tensor_core

    pr = harness.build(harness.Case("bfloat16", **options), np, rng)
    assert tensor_core.head_major(pr, KernelConfig()) == major
    assert not tensor_core.head_major(pr, KernelConfig(head_major_grid=False))


def _output_layouts(B, H, L, E):
    z = np.zeros
    return {"contiguous": z((B, H, L, E)), "token_major": z((B, L, H, E)).transpose(0, 2, 1, 3),
            "transposed": z((B, H, E, L)).transpose(0, 1, 3, 2),
            "expanded": np.broadcast_to(z((1, H, L, E)), (B, H, L, E)),
            "batch_inside_heads": z((H, B, L, E)).transpose(1, 0, 2, 3), "rows_padded": z((B, H, L, 2 * E))[..., :E]}


@pytest.mark.parametrize("name, in_place", [("contiguous", True), ("token_major", True), ("transposed", False),
                                            ("expanded", False), ("batch_inside_heads", False), ("rows_padded", True)])
def test_outputs_are_written_in_place_only_where_the_view_reaches_each_element_once(name, in_place, rng):
    """EFFICIENT writes a caller's output (torch's token-major one) in place where its 6-D view reaches every
    element once with rows of unit stride; dout of any layout reads through the same view, of a contiguous
    copy where needed."""
    from kernels_numba import attention

    B, H, L, E = 2, 3, 5, 4
    q, k, v = _qkv(rng, (B,), H, H, L, L, E, E)
    pr = problem.from_dense(q, k, v)
    plan = attention._views(pr).plan
    x = _output_layouts(B, H, L, E)[name]
    assert attention._writes_rows(x) == in_place
    if name != "expanded":
        x[...] = rng.standard_normal(x.shape)
    view = attention._output_view(pr, plan, x)
    assert view.shape == (1, 1, B, H, L, E) and np.array_equal(view[0, 0], x)
    assert np.shares_memory(view, x) == in_place


SM90_CASES = {  # (dtype, head dim, mask kind, float mask dtype, dropout, varlen)
    "f16_d64_plain": ("float16", 64, None, None, False, False),  # the benchmark's shapes
    "f32_d128_bool_mask": ("float32", 128, "bool", None, False, False),
    "f32_d64_f32_mask_dropout": ("float32", 64, "float", "float32", True, False),  # fp64 dP and delta, both passes
    "bf16_d256_bf16_mask_dropout_varlen": ("bfloat16", 256, "float", "bfloat16", True, True),
}



@pytest.mark.parametrize("full, summed, most, want", [
    ((4, 1, 1, 16), (1, 1, 1, 16), 4, (4, 16)),  # a (1, H, L, S) mask over 4 batch elements: 16 slices apart
    ((4, 1, 1, 16), (1, 1, 1, 16), 3, (2, 16)),  # a divisor of the dim, so that groups tile the slices
    ((4, 1, 1, 16), (4, 1, 1, 1), 4, (4, 1)),  # a (B, 1, L, S) mask: adjacent heads
    ((4, 1, 1, 16), (1, 1, 1, 1), 8, (8, 1)),  # summed over both: the heads
    ((2, 3, 1, 16), (2, 1, 1, 16), 4, (3, 16)),  # a batch dim of 3 inside the first
    ((4, 1, 1, 16), (1, 1, 1, 16), 0, (1, 1)),  # the knob off
    ((4, 1, 1, 16), (4, 1, 1, 16), 4, (1, 1)),  # summed over queries alone: no slices share a sum
])
def test_grid_order_groups_the_slices_that_add_into_one_sum(full, summed, most, want):
    """tensor_core.grid_order: the summed float-mask gradient's slice group from the sums view's zero strides."""
    from kernels_numba import tensor_core

    queries = 1 if summed == full else 5  # (the last case sums over the queries instead)
    sums = np.broadcast_to(np.zeros(summed + (queries, 7), np.float32), full + (5, 7))
    assert tensor_core.grid_order(sums, most) == want



@pytest.mark.parametrize("knobs", [{"tensor_core_dkdv_blocks": 1}, {"tensor_core_dkdv_blocks": 5},
                                   {"tensor_core_dq_blocks": 1},
                                   {"mask_order_group": -1}])
def test_the_backward_s_new_knobs_refuse_values_out_of_range(knobs):
    """KernelConfig refuses a dk/dv or dq block count that no register cap serves and a negative slice group, naming
    the field and its value."""
    from kernels_numba import KernelConfig

    (name, value), = knobs.items()
    with pytest.raises(ValueError, match=f"{name}={value}"):
        KernelConfig(**knobs)


@pytest.mark.parametrize("name", list(SM90_CASES))
def test_portable_kernels_compile_for_sm90(name, monkeypatch):
    """The GPU path of the blocked portable kernels, forward and backward (a broadcast float mask's gradient too;
    not the simulator's), compiles to sm_90 PTX here, without a GPU, and ptxas assembles it at the kernels'
    register cap."""
    import shutil
    import types

    from cusdpa import environment

    if environment.simulator_enabled():
        pytest.skip("this pytest process runs with NUMBA_ENABLE_CUDASIM=1")
    import numba.cuda.dispatcher
    from numba import cuda
    from numba import types as nt

    from kernels_numba import KernelConfig, blocked_forward, gradients, portable

    # Numba asks the current device for the target of device functions; there is none here.
    monkeypatch.setattr(numba.cuda.dispatcher, "get_current_device",
                        lambda: types.SimpleNamespace(compute_capability=(9, 0)))
    dtype, hd, mask_kind, mask_dtype, dropout, varlen = SM90_CASES[name]
    element = {"float16": nt.float16, "bfloat16": nt.uint16, "float32": nt.float32}
    mask_element = nt.boolean if mask_kind != "float" else element[mask_dtype]
    rows6, scalars5 = nt.Array(element[dtype], 6, "A"), nt.Array(nt.float32, 5, "A")
    mask6, dmask6, cu = nt.Array(mask_element, 6, "A"), nt.Array(mask_element, 6, "A"), nt.Array(nt.int32, 1, "A")
    i, f, b = nt.int64, nt.float64, nt.boolean
    structure = (f, b, b, i, i, i, i, i, i, f)  # scale, causal, lower_right, left, right, seed.., threshold, rescale
    arrays = (rows6, rows6, rows6, mask6, rows6, scalars5, scalars5)
    kinds = {None: portable.MASK_NONE, "bool": portable.MASK_BOOL, "float": portable.MASK_FLOAT}
    for kind in ("forward", "dq", "dkdv") + (("dmask",) if mask_kind == "float" else ()):
        dkdv = kind == "dkdv"
        sub_n, sub_m, rows = KernelConfig().blocked_tiles(hd, hd, dkdv)
        spec = gradients.Spec(threads=16, sub_n=sub_n, sub_m=sub_m, chunk=32, rows=rows, head_dim=hd, head_dim_v=hd,
                              bf16=dtype == "bfloat16", mask=kinds[mask_kind], mask_bf16=mask_dtype == "bfloat16",
                              dropout=dropout, varlen=varlen, wide=dtype == "float32")
        if kind == "forward":
            kernel = blocked_forward.forward_kernel(spec)
            sig = (rows6, rows6, rows6, mask6, rows6, scalars5, cu, cu) + (i,) * 8 + structure
        elif kind == "dmask":  # a broadcast float mask's gradient, on the dq kernel's spec
            kernel = gradients.dmask_kernel(spec)
            sig = arrays + (dmask6, nt.UniTuple(i, 6), nt.UniTuple(i, 6), i, i, i) + structure
        elif dkdv:
            kernel = gradients.dkdv_kernel(spec)
            sig = arrays + (rows6, rows6, cu, cu) + (i,) * 5 + (b, b) + (i,) * 7 + structure
        else:
            # delta from out (the default), or summed from P and dP (a broadcast float mask's gradient)
            kernel = gradients.dq_kernel(spec, mask_kind == "float", mask_kind != "float")
            sig = arrays[:5] + (rows6,) + arrays[5:] + (rows6, dmask6, cu, cu) + (i,) * 11 + structure
        ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))
        assert ".target sm_90" in ptx
        ptxas = shutil.which("ptxas")
        if ptxas:
            path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"cusdpa_{name}_{kind}.ptx")
            with open(path, "w") as fh:
                fh.write(ptx)
            proc = subprocess.run([ptxas, "-arch=sm_90", f"-maxrregcount={gradients._max_registers(spec)}", path,
                                   "-o", os.devnull], capture_output=True, text=True)
            os.remove(path)
            assert proc.returncode == 0, proc.stderr[-2000:]



@pytest.mark.parametrize("head_major", [False, True])
def test_tensor_core_wrappers_compile_for_sm90(head_major, monkeypatch):
    """The Numba kernels around the tensor_core tile loops (forward, dq, dk/dv fused; both block orders, column
    parts, mask tiles, shared scores) compile to sm_90 PTX here, without a GPU (the linked CUDA C is compiled by
    tests/test_flash.py)."""
    import types

    from cusdpa import environment

    if environment.simulator_enabled():
        pytest.skip("this pytest process runs with NUMBA_ENABLE_CUDASIM=1")
    import numba.cuda.dispatcher
    from numba import cuda
    from numba import types as nt

    from kernels_numba import tensor_core

    monkeypatch.setattr(numba.cuda.dispatcher, "get_current_device",
                        lambda: types.SimpleNamespace(compute_capability=(9, 0)))
    i, f, b = nt.int64, nt.float64, nt.boolean
    t2, t5, t7, cu = nt.UniTuple(i, 2), nt.UniTuple(i, 5), nt.UniTuple(i, 7), nt.Array(nt.int32, 1, "C")
    tail = (i, i, i, i, f, b, i, i, i, i, i, i, f)  # L, S, E, Ev, scale, lower_right, left, right, seed.., rescale
    operand = (i, t5)
    # (kernel, signature, whether it counts its blocks from the last: the head-fastest order reads the grid's height)
    kernels = [(tensor_core._kernel(64, "bfloat16", False, 0, 168, 64, head_major),
                operand * 4 + (i, t5, i, t7, cu, cu, b, i, i, i, i) + tail, True),
               (tensor_core._dq_kernel(160, "bfloat16", True, 1, 255, head_major, tensor_core.col_parts(160), True),
                operand * 8 + (i, t7, i, t7, cu, cu, b, i, i, i, i) + tail + (i, t2), True),
               # the summed float-mask gradient's, which takes the slice group (grid_order)
               (tensor_core._dq_kernel(64, "bfloat16", False, 2, 168, head_major, 1, True, False, False, True),
                operand * 8 + (i, t7, i, t7, cu, cu, b, i, i, i, i) + tail + (i, t2), True),
               (tensor_core._dkdv_kernel(128, "float16", False, 2, 168, head_major, 1, True, False, True),
                operand * 8 + (i, t7, i, t5, cu, cu, b, i, i, i, i, i) + tail, False),
               # column parts' shared scores (KernelConfig.tensor_core_shared_scores): the last argument of each
               (tensor_core._dq_kernel(128, "float32", False, 0, 255, head_major, 2, False, True, True),
                operand * 8 + (i, t7, i, t7, cu, cu, b, i, i, i, i) + tail + (i, t2), True),
               (tensor_core._dkdv_kernel(160, "bfloat16", True, 1, 255, head_major, 2, True, False, False, True),
                operand * 8 + (i, t7, i, t5, cu, cu, b, i, i, i, i, i) + tail, False)]
    for kernel, sig, descending in kernels:
        ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))
        assert ".target sm_90" in ptx
        assert ("%nctaid.y" in ptx) == (descending and not head_major)



def test_dq_accumulate_passes_compile_for_sm90(monkeypatch):
    """The fused backward's passes (kernels_numba.dq_accumulate: D and the zeroed accumulator, dq or a float mask's
    gradient from fp32 sums) compile to sm_90 PTX here, without a GPU; D's per-row reduction in shared memory."""
    import types

    from cusdpa import environment

    if environment.simulator_enabled():
        pytest.skip("this pytest process runs with NUMBA_ENABLE_CUDASIM=1")
    import numba.cuda.dispatcher
    from numba import cuda
    from numba import types as nt

    from kernels_numba import dq_accumulate

    monkeypatch.setattr(numba.cuda.dispatcher, "get_current_device",
                        lambda: types.SimpleNamespace(compute_capability=(9, 0)))
    f32_6, f32_5 = nt.Array(nt.float32, 6, "A"), nt.Array(nt.float32, 5, "A")
    for bf16, element in ((True, nt.uint16), (False, nt.float16), (False, nt.float32)):
        rows6 = nt.Array(element, 6, "A")
        prepare, _ = cuda.compile_ptx(dq_accumulate.prepare_kernel(bf16).py_func, (rows6, rows6, f32_5, f32_6,
                                                                                    nt.int64), cc=(9, 0))
        convert, _ = cuda.compile_ptx(dq_accumulate.convert_kernel(bf16).py_func, (f32_6, rows6, nt.float64,
                                                                                    nt.int64), cc=(9, 0))
        assert ".target sm_90" in prepare and ".target sm_90" in convert
        assert ".shared" in prepare and "bar.sync" in prepare


if __name__ == "__main__":
    simulator_child.serve(_run_case, list(CASES))
