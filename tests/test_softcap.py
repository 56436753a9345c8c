"""Logit soft-capping (FlashAttention's ``softcap``): scores softcap * tanh(scale q k^T / softcap), then the
mask. The NumPy reference, the public APIs (which take it on the MATH backend until the kernels do) and the
torch bridge, against the formula written out in float64 torch ops."""
import numpy as np
import pytest

import cusdpa
from cusdpa import reference

torch = pytest.importorskip("torch")


def torch_softcapped(q, k, v, dout, softcap, *, mask=None, causal=False, scale=None):
    """out, dq, dk, dv[, dmask] of the formula in float64 torch autograd; ``mask`` is float (added after the
    cap), causal is upper-left."""
    tq, tk, tv = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (q, k, v))
    tm = None if mask is None else torch.tensor(mask, dtype=torch.float64, requires_grad=True)
    s = (tq @ tk.transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)
    s = softcap * torch.tanh(s / softcap)
    if tm is not None:
        s = s + tm
    if causal:
        L, S = s.shape[-2:]
        s = s.masked_fill(torch.ones(L, S, dtype=torch.bool).triu(1), -torch.inf)
    out = torch.softmax(s, -1) @ tv
    out.backward(torch.tensor(dout))
    grads = [t.grad.numpy() for t in (tq, tk, tv)] + ([tm.grad.numpy()] if tm is not None else [])
    return [out.detach().numpy()] + grads


@pytest.mark.parametrize("causal, with_mask", [(False, False), (True, False), (False, True)])
def test_reference_matches_the_formula(causal, with_mask, rng):
    q, k, v = (rng.standard_normal((2, 3, 9, 8)) * 3 for _ in range(3))  # large scores: the cap bites
    dout = rng.standard_normal((2, 3, 9, 8))
    mask = rng.standard_normal((3, 9, 9)) if with_mask else None
    want = torch_softcapped(q, k, v, dout, 2.0, mask=mask, causal=causal)
    got = list(reference.attention(q, k, v, mask, is_causal=causal, softcap=2.0)[:1]) + \
        list(reference.attention_grads(q, k, v, dout, mask, is_causal=causal, softcap=2.0))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)


def test_zero_is_off_and_a_huge_cap_is_the_identity(rng):
    q, k, v = (rng.standard_normal((2, 5, 8)) for _ in range(3))
    plain = reference.attention(q, k, v)[0]
    np.testing.assert_array_equal(reference.attention(q, k, v, softcap=0.0)[0], plain)
    # the cap moves a score x by about x^3 / (3 cap^2) ~ 1e-11: outputs near 0 need an absolute bound too
    np.testing.assert_allclose(reference.attention(q, k, v, softcap=1e6)[0], plain, rtol=1e-9, atol=1e-10)


def test_public_api_runs_it_on_math_and_says_why_not_elsewhere(rng):
    q, k, v = (rng.standard_normal((1, 2, 7, 8)) for _ in range(3))
    out = cusdpa.scaled_dot_product_attention(q, k, v, softcap=1.5)
    np.testing.assert_allclose(out, reference.attention(q, k, v, softcap=1.5)[0], rtol=1e-12)
    out, vjp = cusdpa.attention_vjp(q, k, v, softcap=1.5)
    dout = rng.standard_normal(out.shape)
    for g, w in zip(vjp(dout), reference.attention_grads(q, k, v, dout, softcap=1.5)):
        np.testing.assert_allclose(g, w, rtol=1e-12)
    explanation = str(cusdpa.explain(q.astype(np.float16), k.astype(np.float16), v.astype(np.float16), softcap=1.5))
    assert "soft-capping" in explanation


def test_varlen_takes_it_per_sequence(rng):
    cu = np.array([0, 4, 9], np.int32)
    q, k, v = (rng.standard_normal((9, 2, 8)) * 3 for _ in range(3))
    out = cusdpa.varlen_attention(q, k, v, cu, cu, 5, 5, softcap=2.0)
    for b in range(2):
        rows = slice(cu[b], cu[b + 1])
        want = reference.attention(*(x[rows].swapaxes(0, 1) for x in (q, k, v)), softcap=2.0)[0]
        np.testing.assert_allclose(out[rows], want.swapaxes(0, 1), rtol=1e-12)


@pytest.mark.parametrize("bad, error", [(-1.0, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
                                        (True, TypeError), ("1", TypeError)])
def test_bad_softcap_is_refused(bad, error, rng):
    q = rng.standard_normal((1, 4, 8))
    with pytest.raises(error, match="softcap"):
        cusdpa.scaled_dot_product_attention(q, q, q, softcap=bad)


def test_torch_bridge_with_autograd(rng):
    import interop

    q, k, v = (rng.standard_normal((2, 3, 6, 8)) * 3 for _ in range(3))
    mask = rng.standard_normal((6, 6))
    dout = rng.standard_normal((2, 3, 6, 8))
    want = torch_softcapped(q, k, v, dout, 2.5, mask=mask)
    tq, tk, tv, tm = (torch.tensor(x, requires_grad=True) for x in (q, k, v, mask))
    out = interop.scaled_dot_product_attention(tq, tk, tv, attn_mask=tm, softcap=2.5)
    out.backward(torch.tensor(dout))
    for g, w in zip([out.detach()] + [t.grad for t in (tq, tk, tv, tm)], want):
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-10, atol=1e-12)
    with pytest.raises(TypeError, match="softcap"):
        interop.scaled_dot_product_attention(tq, tk, tv, softcap="2")


def test_the_harness_judges_softcapped_problems(rng):
    """The yardstick caps as the reference does: MATH in bf16 passes the rule, MATH without the cap fails."""
    import dataclasses

    pytest.importorskip("ml_dtypes")
    from cusdpa.backends import math as math_backend
    from cusdpa.verify.harness import Case, run_case

    case = Case(dtype="bfloat16", L=9, S=13, E=16, hq=4, hkv=2, causal="upper_left", softcap=1.0)
    assert run_case(case, math_backend.IMPL, np, rng) == []
    uncapped = dataclasses.replace(math_backend.IMPL, forward=lambda pr, *a, **k: math_backend.IMPL.forward(
        dataclasses.replace(pr, softcap=0.0), *a, **k))
    assert run_case(case, uncapped, np, rng, grads=False)


@pytest.mark.gpu
def test_cupy_calls_take_math_on_the_gpu_within_the_error_rule(rng):
    """FLASH and EFFICIENT decline soft-capping; MATH (cuBLAS through CuPy) is judged by the harness's rule,
    against the float64 reference with PyTorch's same-precision yardstick."""
    import cupy

    from cusdpa.backends import math as math_backend
    from cusdpa.verify.harness import Case, run_case

    case = Case(dtype="float16", hq=4, hkv=2, L=40, S=56, E=64, causal="lower_right", softcap=3.0)
    assert not run_case(case, math_backend.IMPL, cupy, rng)
    q = cupy.asarray(rng.standard_normal((1, 2, 16, 64)), dtype=cupy.float16)
    assert cusdpa.explain(q, q, q, softcap=3.0).chosen is cusdpa.Backend.MATH
