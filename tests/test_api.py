"""Public API: dispatch, sdpa_kernel, explain, vjp, and every documented argument error."""
import subprocess
import sys
import types

import numpy as np
import pytest

import cusdpa
from cusdpa import Backend, reference


def qkv(rng, shape_q=(2, 4, 9, 8), shape_k=(2, 4, 11, 8), ev=8, dtype=np.float64):
    q = rng.standard_normal(shape_q).astype(dtype)
    k = rng.standard_normal(shape_k).astype(dtype)
    v = rng.standard_normal(shape_k[:-1] + (ev,)).astype(dtype)
    return q, k, v


def test_import_needs_only_numpy():
    code = "import sys, cusdpa; bad = [m for m in ('cupy', 'numba', 'torch') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_default_dispatch_on_numpy_runs_math_and_returns_numpy(rng):
    q, k, v = qkv(rng)
    out, lse = cusdpa.scaled_dot_product_attention(q, k, v, is_causal=True, return_lse=True)
    want, want_lse = reference.attention(q, k, v, is_causal=True)
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(lse, want_lse)
    assert cusdpa.explain(q, k, v).chosen is Backend.MATH


def test_attention_vjp_matches_reference_gradients(rng):
    q, k, v = qkv(rng)
    mask = rng.standard_normal((9, 11))
    out, vjp = cusdpa.attention_vjp(q, k, v, mask, dropout_p=0.2, seed=5, enable_gqa=False)
    dout = rng.standard_normal(out.shape)
    grads = vjp(dout)
    assert len(grads) == 4 and grads[3].shape == mask.shape
    for g, w in zip(grads, reference.attention_grads(q, k, v, dout, mask, dropout_p=0.2, seed=5)):
        np.testing.assert_array_equal(g, w)
    with pytest.raises(ValueError, match="dout.shape"):
        vjp(dout[..., :3])
    with pytest.raises(TypeError, match="dout.dtype"):
        vjp(dout.astype(np.float32))


def test_vjp_reuses_the_drawn_seed(rng):
    q, k, v = qkv(rng)
    out, vjp = cusdpa.attention_vjp(q, k, v, dropout_p=0.5)  # seed drawn once, kept for the backward
    out2, vjp2 = cusdpa.attention_vjp(q, k, v, dropout_p=0.5)
    assert not np.array_equal(out, out2)
    dout = rng.standard_normal(out.shape)
    assert not np.array_equal(vjp(dout)[0], vjp2(dout)[0])
    np.testing.assert_array_equal(vjp(dout)[0], vjp(dout)[0])


def test_varlen_api_round_trip(rng):
    cu = np.array([0, 3, 3, 10], np.int32)
    q, k, v = (rng.standard_normal((10, 2, 8)) for _ in range(3))
    out, lse = cusdpa.varlen_attention(q, k, v, cu, cu, 7, 7, is_causal=True, return_lse=True)
    assert out.shape == (10, 2, 8) and lse.shape == (2, 10)
    out2, vjp = cusdpa.varlen_attention_vjp(q, k, v, cu, cu, 7, 7, is_causal=True)
    np.testing.assert_array_equal(out, out2)
    assert [g.shape for g in vjp(np.ones_like(out))] == [q.shape, k.shape, v.shape]


def test_allow_tf32_is_a_checked_option_that_exact_backends_ignore(rng):
    """allow_tf32 reaches the Problem (EFFICIENT's tensor_core loops read it for fp32 inputs); MATH computes
    exactly with it as without, and a non-bool is refused."""
    from cusdpa import problem

    q, k, v = qkv(rng, dtype=np.float32)
    assert problem.from_dense(q, k, v, None, problem.Options(allow_tf32=True)).allow_tf32
    assert not problem.from_dense(q, k, v).allow_tf32
    for fn in (cusdpa.scaled_dot_product_attention, lambda *a, **kw: cusdpa.attention_vjp(*a, **kw)[0]):
        np.testing.assert_array_equal(fn(q, k, v, is_causal=True, allow_tf32=True), fn(q, k, v, is_causal=True))
    with pytest.raises(cusdpa.ArgumentTypeError, match="allow_tf32"):
        cusdpa.scaled_dot_product_attention(q, k, v, allow_tf32=1)


def test_sdpa_kernel_restricts_and_reorders():
    from cusdpa import dispatch

    assert dispatch.enabled_backends() == (Backend.FLASH, Backend.EFFICIENT, Backend.MATH)
    with cusdpa.sdpa_kernel([Backend.MATH, Backend.FLASH]):
        assert dispatch.enabled_backends() == (Backend.FLASH, Backend.MATH)
        with cusdpa.sdpa_kernel([Backend.MATH, Backend.FLASH], set_priority=True):
            assert dispatch.enabled_backends() == (Backend.MATH, Backend.FLASH)
        assert dispatch.enabled_backends() == (Backend.FLASH, Backend.MATH)
    assert dispatch.enabled_backends() == dispatch.DEFAULT_PRIORITY
    with pytest.raises(TypeError, match="Backend members"):
        with cusdpa.sdpa_kernel(["math"]):
            pass


def test_no_backend_error_lists_every_backend_with_reasons(rng):
    q, k, v = qkv(rng)
    with cusdpa.sdpa_kernel(Backend.FLASH):
        with pytest.raises(NotImplementedError) as info:
            cusdpa.scaled_dot_product_attention(q, k, v)
    text = str(info.value)
    assert "FLASH: " in text and "EFFICIENT: " in text and "MATH: disabled by sdpa_kernel" in text
    assert "float64" in text and "cupy arrays" in text


def test_explain_names_reasons(rng, monkeypatch):
    import dataclasses

    from cusdpa.backends.flash import launches

    q, k, v = qkv(rng, dtype=np.float32)
    ex = cusdpa.explain(q, k, v, attn_mask=np.zeros((9, 11), np.float32), need_grad=True)
    assert ex.chosen is Backend.MATH and ex.reasons[Backend.MATH] == []
    flash = " ".join(ex.reasons[Backend.FLASH])
    assert "float32" in flash and "float attn_mask" not in flash and "numpy arrays" in flash
    real = launches.config  # without the Hopper backward's mask gradient, FLASH says it lacks one
    monkeypatch.setattr(launches, "config", lambda pr: dataclasses.replace(real(pr), bwd90_mask_grad=False))
    ex = cusdpa.explain(q, k, v, attn_mask=np.zeros((9, 11), np.float32), need_grad=True)
    assert "float attn_mask" in " ".join(ex.reasons[Backend.FLASH])
    assert ex.reasons[Backend.EFFICIENT]
    assert "MATH: available" in str(ex)


def _fake_cupy(monkeypatch):
    """A stand-in 'cupy' module so mixing can be tested on a machine without CuPy."""
    mod = types.ModuleType("cupy")
    cls = type("ndarray", (), {"__module__": "cupy._core.core", "dtype": np.dtype("float32"),
                               "ndim": 3, "shape": (4, 9, 8)})
    mod.ndarray = cls
    monkeypatch.setitem(sys.modules, "cupy", mod)
    return cls()


def test_mixing_numpy_and_cupy_is_an_error(rng, monkeypatch):
    q, k, v = qkv(rng, dtype=np.float32)
    fake = _fake_cupy(monkeypatch)
    with pytest.raises(TypeError, match="cannot be mixed"):
        cusdpa.scaled_dot_product_attention(q, fake, v)


BAD_DENSE = [
    # (description, kwargs transform, exception, message fragment)
    ("head dims differ", dict(k=(2, 4, 11, 6)), ValueError, "differ in head dim"),
    ("batch dims", dict(q=(3, 4, 9, 8)), ValueError, "do not broadcast"),
    ("kv length", dict(v=(2, 4, 12, 8)), ValueError, "must agree in length S"),
    ("gqa off", dict(q=(2, 8, 9, 8)), ValueError, "enable_gqa=True"),
    ("gqa divisibility", dict(q=(2, 6, 9, 8), k=(2, 4, 11, 8), v=(2, 4, 11, 8), enable_gqa=True), ValueError,
     "neither broadcast (each 1 or the same) nor group"),
    ("heads neither broadcast", dict(q=(2, 2, 9, 8), k=(2, 3, 11, 8), v=(2, 3, 11, 8)), ValueError,
     "have 2, 3 and 3 heads"),
    ("rank 1", dict(q=(8,)), ValueError, "rank 1"),
    ("mask shape", dict(attn_mask=np.zeros((9, 10), bool)), ValueError, "does not broadcast"),
    ("mask rank", dict(attn_mask=np.zeros((1, 2, 4, 9, 11), bool)), ValueError, "does not broadcast"),
    ("int mask", dict(attn_mask=np.zeros((9, 11), np.int64)), TypeError, "attn_mask.dtype=int64"),
    ("dropout high", dict(dropout_p=1.5), ValueError, "dropout_p=1.5"),
    ("dropout low", dict(dropout_p=-0.1), ValueError, "dropout_p=-0.1"),
    ("dropout nan", dict(dropout_p=float("nan")), ValueError, "dropout_p=nan"),
    ("scale zero", dict(scale=0.0), ValueError, "scale=0.0"),
    ("scale negative", dict(scale=-1.0), ValueError, "scale=-1.0"),
    ("scale inf", dict(scale=float("inf")), ValueError, "scale=inf"),
    ("scale nan", dict(scale=float("nan")), ValueError, "scale=nan"),
    ("scale type", dict(scale="big"), TypeError, "scale='big'"),
    # a FlashAttention call ported positionally: softmax_scale lands on is_causal, causal on scale
    ("is_causal float", dict(is_causal=0.25), TypeError, "is_causal=0.25 must be a bool"),
    ("is_causal str", dict(is_causal="no"), TypeError, "is_causal='no' must be a bool"),
    ("scale bool", dict(scale=True), TypeError, "scale=True must be a real number"),
    ("dropout bool", dict(dropout_p=True), TypeError, "dropout_p=True must be a real number"),
    ("gqa int", dict(enable_gqa=1), TypeError, "enable_gqa=1 must be a bool"),
    ("mixed dtypes", dict(k_dtype=np.float16), TypeError, "must share one dtype"),
    ("int inputs", dict(dtype=np.int32), TypeError, "query.dtype=int32"),
    ("complex inputs", dict(dtype=np.complex64), TypeError, "query.dtype=complex64"),
    ("causal variant", dict(causal_variant="diagonal"), ValueError, "causal_variant='diagonal'"),
    ("window type", dict(window=3), TypeError, "window=3"),
    ("window size", dict(window=(-2, 0)), ValueError, "window=(-2, 0)"),
    ("seed negative", dict(seed=-1), ValueError, "seed=-1"),
    ("seed type", dict(seed=1.5), TypeError, "seed=1.5"),
    ("seed pair", dict(seed=(1, 2, 3)), ValueError, "(seed, offset)"),
]


@pytest.mark.parametrize("desc,change,exc,fragment", BAD_DENSE, ids=[b[0] for b in BAD_DENSE])
def test_bad_dense_arguments(desc, change, exc, fragment, rng):
    change = dict(change)
    dtype = change.pop("dtype", np.float32)
    shapes = {n: change.pop(n, s) for n, s in (("q", (2, 4, 9, 8)), ("k", (2, 4, 11, 8)), ("v", (2, 4, 11, 8)))}
    arrays = {n: (rng.standard_normal(s) * 3).astype(dtype) for n, s in shapes.items()}
    if "k_dtype" in change:
        arrays["k"] = arrays["k"].astype(change.pop("k_dtype"))
    with pytest.raises(exc, match=fragment.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")) as raised:
        cusdpa.scaled_dot_product_attention(arrays["q"], arrays["k"], arrays["v"], **change)
    assert isinstance(raised.value, RuntimeError), "callers written for PyTorch catch RuntimeError"


def test_non_array_input_is_a_type_error():
    with pytest.raises(TypeError, match="query must be a numpy.ndarray or cupy.ndarray, got builtins.list"):
        cusdpa.scaled_dot_product_attention([[1.0]], np.ones((1, 1)), np.ones((1, 1)))


def _varlen_args(rng):
    cu = np.array([0, 4, 9], np.int32)
    q, k, v = (rng.standard_normal((9, 2, 8)) for _ in range(3))
    return q, k, v, cu


@pytest.mark.parametrize("desc,cu,exc,fragment", [
    ("int64", np.array([0, 4, 9], np.int64), TypeError, "must be int32"),
    ("decreasing", np.array([0, 5, 4, 9], np.int32), ValueError, "non-decreasing"),
    ("start", np.array([1, 4, 9], np.int32), ValueError, r"cu_seqlens_q\[0\]=1 must be 0"),
    ("end", np.array([0, 4, 8], np.int32), ValueError, "token count"),
    ("rank", np.array([[0, 4, 9]], np.int32), ValueError, r"must be \(B \+ 1,\)"),
])
def test_bad_cu_seqlens(desc, cu, exc, fragment, rng):
    q, k, v, good = _varlen_args(rng)
    with pytest.raises(exc, match=fragment):
        cusdpa.varlen_attention(q, k, v, cu, good, 9, 9)


def test_bad_varlen_max_seqlen_and_layout(rng):
    q, k, v, cu = _varlen_args(rng)
    with pytest.raises(ValueError, match=r"max_seqlen_k=4 must be an int >= the longest sequence \(5\)"):
        cusdpa.varlen_attention(q, k, v, cu, cu, 5, 4)
    with pytest.raises(ValueError, match="total_tokens, heads, head_dim"):
        cusdpa.varlen_attention(q[None], k, v, cu, cu, 5, 5)
    with pytest.raises(ValueError, match="B \\+ 1"):
        cusdpa.varlen_attention(q, k, v, cu, np.array([0, 9], np.int32), 5, 9)
