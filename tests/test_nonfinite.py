"""NaN and inf behave as PyTorch's do: they propagate where a query sees them, never from where no query
may look, and large finite inputs stay finite. The rule is the reference's (cusdpa/reference.py).

- CPU: the reference (the MATH backend's code) against PyTorch's math backend in float64, NaN, +inf and
  -inf pattern for pattern; NaN where no query may look gives exactly what zeros there give. (PyTorch's
  CPU flash kernel, its float64 default, returns 0 for a row of NaN scores, so it is not the oracle.)
- Simulator: the EFFICIENT portable kernels on Numba's CUDA simulator, in a child process started with
  NUMBA_ENABLE_CUDASIM=1 (this file run as a script), as tests/test_efficient_sim.py explains.
- GPU (marked gpu): FLASH and both EFFICIENT variants on CuPy arrays, and the torch bridge.

Kernels are judged by the one harness: an output must be NaN or inf exactly where the reference is, and
within the error rule elsewhere. Their NaN patterns are compared on problems where no NaN meets a pair
whose probability is 0 (reference.py says why kernels may differ there); the reference is checked on
those too.
"""

import numpy as np
import pytest
import simulator_child

from cusdpa import problem, reference
from cusdpa.verify import harness

torch = pytest.importorskip("torch")  # the CPU oracle and the harness's yardstick

B, H = 2, 2  # the NaN is put in one (batch, head) slice: it must not leave it
SMALL = dict(L=5, S=7, E=4, Ev=3)
# q = k = v = these: scores of 5e10 to 1e12, whose exp2 overflowed in the fused kernels (inf / inf = NaN).
# Each is a * 2^b with 64 a^2 < 2^24, so every partial sum of q . k is exact in fp32: the forward and the
# backward see the very same score whatever order they sum in.
LARGE_SCORES = [("bfloat16", 133120.0), ("float16", 28672.0)]


# ---- the problems --------------------------------------------------------------------------------------

def _qkv(rng, dtype, L, S, E, Ev, hkv=H):
    return (harness.draw(rng, (B, H, L, E), dtype), harness.draw(rng, (B, hkv, S, E), dtype),
            harness.draw(rng, (B, hkv, S, Ev), dtype))


def visible_case(rng, name, dtype="float64", xp=np, L=5, S=7, E=4, Ev=3):
    """A problem with NaN or inf where queries see it (a finite float mask allows every pair)."""
    q, k, v = _qkv(rng, dtype, L, S, E, Ev, hkv=1 if name == "gqa_k_nan" else H)
    mask = harness.draw(rng, (B, H, L, S) if name != "mask_inf_broadcast" else (L, S), dtype) \
        if name.startswith("mask") else None
    if name == "q_nan":
        q[0, 1, 2, 1] = np.nan
    elif name in ("k_nan", "gqa_k_nan"):
        k[1, 0, 3, 2] = np.nan
    elif name == "v_nan":
        v[0, 0, 4, 2] = np.nan
    elif name == "v_inf":  # P > 0 everywhere: out[..., 2] = +inf, out[..., 0] = -inf
        q *= 0.125  # scores near 0: no P so small that fp16 rounds it to 0 (0 * inf would be NaN)
        v[0, 0, 4, 2] = np.inf
        v[1, 1, 2, 0] = -np.inf
    elif name == "q_inf":  # every score of the row +inf: inf - inf = NaN
        q[1, 0, 2, 1] = np.inf
        k[1, 0, :, 1] = np.abs(k[1, 0, :, 1].astype(np.float32)) + 0.5
    elif name == "k_neg_inf":  # +inf scores (NaN rows) and -inf ones (P = 0) at one key
        k[1, 0, 3, 1] = -np.inf
        # q's signs in that column decide which: force both kinds (random signs all came out positive once)
        column = np.abs(q[1, 0, :, 1].astype(np.float32)) + 0.5
        q[1, 0, :, 1] = np.where(np.arange(L) % 2 == 0, column, -column)
    elif name == "mask_nan":
        mask[1, 1, 3, 4] = np.nan
    elif name == "mask_inf":
        mask[1, 1, 3, 4] = np.inf
    elif name == "mask_inf_broadcast":  # (L, S), added to every slice: two +inf in row 3, NaN in row 0
        mask[3, 4] = mask[3, 1] = np.inf
        mask[0, 2] = np.nan
    arrays = [xp.asarray(x) for x in (q, k, v)] + [None if mask is None else xp.asarray(mask)]
    return problem.from_dense(*arrays, problem.Options(enable_gqa=name == "gqa_k_nan"))


VISIBLE = ["q_nan", "k_nan", "gqa_k_nan", "v_nan", "v_inf", "q_inf", "k_neg_inf", "mask_nan", "mask_inf",
           "mask_inf_broadcast"]
# k_neg_inf: finite rows meet the -inf key only through dS = 0 (P = 0 there), and 0 * -inf in dS k is NaN in
# the reference and PyTorch; EFFICIENT zeroes non-finite keys for dq and gives a finite dq.
KERNEL_VISIBLE = [name for name in VISIBLE if name != "k_neg_inf"]


def hidden_case(rng, name, dtype="float64", xp=np, E=4, Ev=3):
    """(problem with NaN and inf stored only where no query may look, the same problem with zeros there)."""
    L, S, opts, mask, cu = 6, 9, {}, None, None
    if name == "causal_rows":
        L, S = 9, 4
    if name == "varlen":
        cu = (np.array([0, 4, 7, 12], np.int32), np.array([0, 5, 5, 9], np.int32), 5, 5)
        q, k, v = (harness.draw(rng, (n, H, d), dtype) for n, d in ((12, E), (9, E), (9, Ev)))
    else:
        q, k, v = _qkv(rng, dtype, L, S, E, Ev)
    dirty = [q.copy(), k.copy(), v.copy()]
    if name in ("bool_padding", "float_padding"):
        allowed = np.ones((B, 1, L, S), bool)
        allowed[0, ..., 6:] = allowed[1, ..., 2:4] = False  # key padding
        allowed[1, :, 4] = False  # a query row that sees nothing
        mask = allowed if name == "bool_padding" else \
            np.where(allowed, harness.draw(rng, allowed.shape, dtype), -np.inf).astype(q.dtype)
        for b, keys in ((0, slice(6, None)), (1, slice(2, 4))):
            dirty[1][b, :, keys] = np.nan
            dirty[2][b, :, keys] = np.inf
        dirty[0][1, :, 4] = np.nan
    elif name == "causal_keys":  # upper-left with L < S: keys >= L are never seen
        opts = dict(is_causal=True)
        dirty[1][:, :, 6:] = np.nan
        dirty[2][:, :, 7:] = -np.inf
    elif name == "causal_rows":  # lower-right with L > S: the first L - S rows see nothing
        opts = dict(is_causal=True, causal_variant="lower_right")
        dirty[0][:, :, :5] = np.nan
    elif name == "window":  # rows see keys [i - 2, i]: keys >= L are never seen
        opts = dict(window=(2, 0))
        dirty[1][0, 1, 7:] = np.nan
        dirty[2][1, 0, 6:] = np.nan
    elif name == "float_mask_hidden_by_causal":  # NaN mask values where causal hides the pair
        opts = dict(is_causal=True)
        mask = harness.draw(rng, (L, S), dtype)
    elif name == "varlen":  # lower-right causal; sequence 1 has no keys, so its queries see nothing
        opts = dict(is_causal=True, causal_variant="lower_right")
        dirty[0][4:7] = np.nan
    clean = [np.where(np.isfinite(d.astype(np.float64)), x, 0).astype(x.dtype) for d, x in zip(dirty, (q, k, v))]
    masks = [mask, mask]
    if name == "float_mask_hidden_by_causal":
        masks[0] = np.where(np.tril(np.ones((L, S), bool)), mask, np.nan).astype(mask.dtype)
    problems = []
    for arrays, m in zip((dirty, clean), masks):
        arrays = [xp.asarray(x) for x in arrays]
        if cu is None:
            problems.append(problem.from_dense(*arrays, None if m is None else xp.asarray(m), problem.Options(**opts)))
        else:
            problems.append(problem.from_varlen(*arrays, *map(xp.asarray, cu[:2]), *cu[2:], problem.Options(**opts)))
    return problems


HIDDEN = ["bool_padding", "float_padding", "causal_keys", "causal_rows", "window", "float_mask_hidden_by_causal",
          "varlen"]


def _results(impl, pr, dout):
    """(out, lse, dq, dk, dv[, dmask]) of a backend (an Implementation; None: the reference)."""
    if impl is None:
        return reference.forward(pr) + reference.backward(pr, dout)
    out, lse = impl.forward(pr)
    return (out, lse) + tuple(impl.backward(pr, out, lse, dout))


# ---- CPU: the reference against PyTorch ----------------------------------------------------------------

def _assert_like(got, want, what):
    for special, test in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
        np.testing.assert_array_equal(test(got), test(want), err_msg=f"{what}: where {special}")
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-9, atol=1e-11, err_msg=what)


@pytest.mark.parametrize("name", VISIBLE)
def test_reference_propagates_nan_and_inf_as_torch_does(name, rng):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    pr = visible_case(rng, name)
    dout = rng.standard_normal(pr.out_shape)
    out, lse = reference.forward(pr)
    assert np.isnan(out).any() or np.isinf(out).any()
    leaves = [torch.tensor(x, requires_grad=True) for x in (pr.q, pr.k, pr.v, pr.mask) if x is not None]
    with sdpa_kernel([SDPBackend.MATH]):
        t_out = torch.nn.functional.scaled_dot_product_attention(*leaves[:3], attn_mask=(leaves[3:] or [None])[0],
                                                                 enable_gqa=pr.hq != pr.hkv)
    t_out.backward(torch.tensor(dout))
    _assert_like(out, t_out.detach().numpy(), "out")
    for what, g, t in zip(("dq", "dk", "dv", "dmask"), reference.backward(pr, dout), leaves):
        _assert_like(g, t.grad.numpy(), what)
    # lse: NaN on the rows with a NaN or +inf score (torch.logsumexp gives +inf for +inf), else torch's
    tq, tk = torch.tensor(pr.q), torch.tensor(pr.k).repeat_interleave(pr.group, 1)
    s = (tq @ tk.transpose(-1, -2)) * pr.scale + (0 if pr.mask is None else torch.tensor(pr.mask))
    bad = (s.isnan() | s.isposinf()).any(-1).numpy()
    np.testing.assert_array_equal(np.isnan(lse), bad)
    np.testing.assert_allclose(lse[~bad], torch.logsumexp(s, -1).numpy()[~bad], rtol=2e-7)


@pytest.mark.parametrize("name", HIDDEN)
def test_reference_nan_where_no_query_looks_gives_what_zeros_give(name, rng):
    dirty, clean = hidden_case(rng, name)
    dout = rng.standard_normal(clean.out_shape)
    want = _results(None, clean, dout)
    assert not any(np.isnan(x).any() or np.isposinf(x).any() for x in want)
    for got, ref in zip(_results(None, dirty, dout), want):
        np.testing.assert_array_equal(got, ref)


def test_reference_varlen_nan_stays_in_its_sequence(rng):
    """A NaN key of sequence 0, head 0 makes all of that slice NaN and nothing else changes."""
    cu_q, cu_k = np.array([0, 3, 8], np.int32), np.array([0, 4, 9], np.int32)
    q, k, v = (rng.standard_normal((n, H, 4)) for n in (8, 9, 9))
    k2 = k.copy()
    k2[1, 0, 2] = np.nan
    dout = rng.standard_normal(q.shape)
    got, want = (_results(None, problem.from_varlen(q, keys, v, cu_q, cu_k, 5, 5), dout) for keys in (k2, k))
    slice0 = (np.s_[:3, 0], np.s_[0, :3], np.s_[:3, 0], np.s_[:4, 0], np.s_[:4, 0])  # out, lse, dq, dk, dv
    for name, a, b, part in zip(("out", "lse", "dq", "dk", "dv"), got, want, slice0):
        assert np.isnan(a[part]).all(), name
        a, b = a.copy(), b.copy()
        a[part] = b[part] = 0
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_rows_that_see_nothing_stay_zero_next_to_nan_rows(rng):
    """Row 1 sees nothing; key 2 holds NaN values and every other row sees it. Row 1 still gets out 0,
    lse -inf and dq 0, and whatever its q and dout hold adds nothing to dk, dv or dmask."""
    q, k, v = _qkv(rng, "float64", **SMALL)
    v[:, :, 2] = np.nan
    mask = harness.draw(rng, (B, H, SMALL["L"], SMALL["S"]), "float64")
    mask[:, :, 1] = -np.inf
    dout = rng.standard_normal((B, H, SMALL["L"], SMALL["Ev"]))
    out, lse = reference.attention(q, k, v, mask)
    grads = reference.attention_grads(q, k, v, dout, mask)
    assert np.all(out[:, :, 1] == 0) and np.all(lse[:, :, 1] == -np.inf) and np.all(grads[0][:, :, 1] == 0)
    assert np.isnan(out[:, :, [0, 2, 3, 4]]).all()
    q2, dout2 = q.copy(), dout.copy()
    q2[:, :, 1], dout2[:, :, 1] = np.nan, 1e300
    for a, b in zip(grads, reference.attention_grads(q2, k, v, dout2, mask)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype,value", LARGE_SCORES)
@pytest.mark.parametrize("accum", [np.float64, np.float32])
def test_reference_large_finite_inputs_stay_finite(dtype, value, accum):
    x = np.full((1, 1, 1, 64), value, harness.np_dtype(dtype))
    out, lse = reference.attention(x, x, x, accum=accum)
    assert np.all(out.astype(np.float64) == value)
    np.testing.assert_allclose(lse, value * value * 8, rtol=1e-6)
    dq, dk, dv = (g.astype(np.float64) for g in reference.attention_grads(x, x, x, np.ones_like(x), accum=accum))
    assert not dq.any() and not dk.any() and np.all(dv == 1)


# ---- kernels: the checks the simulator and the GPU share ---------------------------------------------

def failures_where_taken(impl, pr, rng):
    """The harness's verdicts on ``pr``, or None where the backend does not take it (FLASH: masks, fp32)."""
    return None if impl.not_supported_reasons(pr, True) else harness.run_problem(pr, impl, rng)


def visible_failures(impl, rng, name, dtype, xp, **sizes):
    return failures_where_taken(impl, visible_case(rng, name, dtype, xp, **sizes), rng)


def hidden_failures(impl, rng, name, dtype, xp, bitwise=True, **sizes):
    """Judged against the reference and, with ``bitwise``, compared bit for bit with what zeros give; None
    where the backend does not take the problem."""
    dirty, clean = hidden_case(rng, name, dtype, xp, **sizes)
    mask_grad = not impl.not_supported_reasons(dirty, True, True)  # a float mask's gradient where the backend gives one
    if impl.not_supported_reasons(dirty, True, mask_grad):
        return None
    failures = harness.run_problem(dirty, impl, rng, mask_grad=mask_grad)
    if bitwise:
        dout = xp.asarray(harness.draw(rng, clean.out_shape, dtype))
        got, want = (_results(impl, pr, dout) for pr in (dirty, clean))
        failures += [f"result {n} differs from the run with zeros where no query looks"
                     for n, (a, b) in enumerate(zip(got, want)) if not bool(xp.array_equal(a, b))]
    return failures


def large_finite_failures(impl, xp, to_host):
    """q = k = v = a large value: out is that value exactly; with one key dq = dk = 0 and dv = dout = 1
    exactly. (Several keys at the max have P = 1/n, and lse = max + log n rounds to max in fp32, so the
    backward cannot get 1/n: forward only.)"""
    failures = []
    for dtype, value in LARGE_SCORES:
        for shape in ((1, 2, 1, 64), (1, 1, 3, 64)):
            x = xp.asarray(np.full(shape, value, harness.np_dtype(dtype)))
            pr = problem.from_dense(x, x, x, None, problem.Options())
            if shape[2] > 1:
                out = to_host(impl.forward(pr)[0])
                failures += [f"{dtype} {value} {shape}: out {out.ravel()[:4]}"] if not np.all(out == value) else []
                continue
            out, lse, dq, dk, dv = map(to_host, _results(impl, pr, xp.asarray(np.ones(shape, x.dtype))))
            if not np.all(out == value) or not np.allclose(lse, value * value * 8, rtol=1e-6):
                failures.append(f"{dtype} {value} {shape}: out {out.ravel()[:4]}, lse {lse.ravel()}")
            if dq.any() or dk.any() or not np.all(dv == 1):
                failures.append(f"{dtype} {value} {shape}: dq {dq.ravel()[:2]} dk {dk.ravel()[:2]} dv {dv.ravel()[:2]}")
    return failures


# ---- the EFFICIENT portable kernels on Numba's CUDA simulator ------------------------------------------

SIM_CASES = [f"visible/{name}" for name in KERNEL_VISIBLE] + [f"hidden/{name}" for name in HIDDEN] + ["large_finite"]


def _sim_case(impl, name, rng):
    kind, _, case = name.partition("/")
    if kind == "visible":
        return visible_failures(impl, rng, case, "float32", np, **SMALL)
    if kind == "hidden":  # judged only: the clean run to compare bit for bit would double the time
        return hidden_failures(impl, rng, case, "float32", np, bitwise=False)
    return large_finite_failures(impl, np, lambda a: np.asarray(a, np.float64))


def _run_sim_case(name_seed):
    import zlib

    from cusdpa.backends import efficient
    from cusdpa.verify.check import simulator_tiles
    from kernels_numba import configured

    name, seed = name_seed
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    with configured(simulator_tiles()):
        return name, _sim_case(efficient.IMPL, name, rng)


@pytest.mark.parametrize("name", SIM_CASES)
def test_efficient_portable_on_the_simulator(name, simulator_results):
    simulator_child.assert_passed(simulator_results, name)


# ---- GPU: FLASH and EFFICIENT on CuPy arrays, and the torch bridge --------------------------------------

@pytest.fixture(params=["FLASH", "EFFICIENT/tensor_core", "EFFICIENT/portable", "MATH"])
def on_gpu(request):
    """Runs ``check(impl)`` with the backend (and EFFICIENT forward variant) of the parameter."""
    import kernels_numba
    from cusdpa.backends import efficient, flash
    from cusdpa.backends import math as math_backend

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA build of torch for the harness's yardstick")
    backend, _, variant = request.param.partition("/")

    def run(check):
        if backend != "EFFICIENT":
            return check(flash.IMPL if backend == "FLASH" else math_backend.IMPL)
        with kernels_numba.configured(kernels_numba.KernelConfig(variant=variant,
                                                                 tensor_core_fp32=variant == "tensor_core")):
            return check(efficient.IMPL)

    return run


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])  # fp32: TF32 parts of an inf stay inf
@pytest.mark.parametrize("name", KERNEL_VISIBLE)
def test_gpu_nan_and_inf_propagate(on_gpu, dtype, name, rng):
    """Several tiles each way (L = 150, S = 130)."""
    import cupy

    failures = on_gpu(lambda impl: visible_failures(impl, rng, name, dtype, cupy, L=150, S=130, E=64, Ev=64))
    if failures is None:
        pytest.skip("the backend does not take this problem")
    assert not failures, "\n".join(failures)


@pytest.mark.gpu
@pytest.mark.parametrize("E", [16, 64])  # 64: FLASH's Hopper forward, whose producer zeroes V rows nobody sees
@pytest.mark.parametrize("name", HIDDEN)
def test_gpu_nan_where_no_query_looks_stays_there(on_gpu, name, E, rng):
    import cupy

    failures = on_gpu(lambda impl: hidden_failures(impl, rng, name, "float16", cupy, E=E, Ev=E))
    if failures is None:
        pytest.skip("the backend does not take this problem")
    assert not failures, "\n".join(failures)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_gpu_rows_that_see_nothing_stay_zero_next_to_nan_rows(on_gpu, dtype, rng):
    """Lower-right causal with L = 150 > S = 40: rows 0..109 see nothing (and hold NaN) and share tiles
    with rows that all see key 0, whose value holds NaN in one column of head 1: out, lse and dq of the
    empty rows must stay 0, -inf and 0, where P = 0 meets that NaN in P V and K in dS K."""
    import cupy

    q, k, v = _qkv(rng, dtype, 150, 40, 64, 64)
    q[:, :, :110] = np.nan
    v[:, 1, 0, 5] = np.nan
    pr = problem.from_dense(*map(cupy.asarray, (q, k, v)), None,
                            problem.Options(is_causal=True, causal_variant="lower_right"))
    failures = on_gpu(lambda impl: failures_where_taken(impl, pr, rng))
    if failures is None:
        pytest.skip("the backend does not take this problem")
    assert not failures, "\n".join(failures)


@pytest.mark.gpu
def test_gpu_large_finite_inputs_stay_finite(on_gpu):
    """The kernels fused the scaled score into an fmaf against the separately rounded row max: off by
    thousands in the exponent at these scores, so out was NaN."""
    import cupy

    from cusdpa.verify import judge

    failures = on_gpu(lambda impl: large_finite_failures(impl, cupy, lambda a: judge.to_float64(a).get()))
    assert not failures, "\n".join(failures)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["FLASH", "EFFICIENT"])
@pytest.mark.parametrize("name", ["q_nan", "k_nan", "v_nan"])
def test_torch_bridge_propagates_nan_as_torch_does(backend, name, rng):
    import functools

    from torch.nn.attention import SDPBackend, sdpa_kernel

    import interop
    from cusdpa import Backend

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA build of torch")
    pr = visible_case(rng, name, "float16", E=16, Ev=16)
    q, k, v = (torch.tensor(x.astype(np.float32)).to("cuda", torch.float16).requires_grad_()
               for x in (pr.q, pr.k, pr.v))
    attention = functools.partial(interop.scaled_dot_product_attention, backend=getattr(Backend, backend))
    failures = harness.run_torch(attention, q, k, v, rng=rng)
    assert not failures, "\n".join(failures)
    out = attention(q, k, v)
    dout = torch.randn_like(out)
    with sdpa_kernel([SDPBackend.MATH]):
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    for what, a, b in zip(("out", "dq", "dk", "dv"), (out,) + torch.autograd.grad(out, (q, k, v), dout),
                          (want,) + torch.autograd.grad(want, (q, k, v), dout)):
        assert torch.equal(a.isnan(), b.isnan()), what


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["FLASH", "EFFICIENT"])
def test_torch_bridge_large_finite_inputs_stay_finite(backend):
    import interop
    from cusdpa import Backend

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA build of torch")
    x = torch.full((1, 1, 1, 64), 133120.0, device="cuda", dtype=torch.bfloat16)
    out = interop.scaled_dot_product_attention(x, x, x, backend=getattr(Backend, backend))
    assert torch.equal(out, x)
    assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(x, x, x))  # PyTorch's own


if __name__ == "__main__":
    simulator_child.serve(_run_sim_case, SIM_CASES)
