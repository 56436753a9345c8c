"""ALiBi (FlashAttention's ``alibi_slopes``): scores get -slope * |i + S - L - j| after the soft-cap, aligned
bottom-right whatever the causal alignment. The NumPy reference and the public array APIs (which take it on
the MATH backend until the kernels do), against the formula written out in float64 torch ops."""
import numpy as np
import pytest

import cusdpa
from cusdpa import reference

torch = pytest.importorskip("torch")


def torch_alibi(q, k, v, dout, slopes, *, causal=False, softcap=0.0, mask=None):
    """out, dq, dk, dv of the formula in float64 torch autograd; ``slopes`` broadcasts to (..., H) of q;
    causal is upper-left; ``mask`` is bool (True = attend)."""
    tq, tk, tv = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (q, k, v))
    L, S = q.shape[-2], k.shape[-2]
    s = (tq @ tk.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    distance = (torch.arange(L)[:, None] + S - L - torch.arange(S)[None, :]).abs().double()
    s = s - torch.tensor(slopes, dtype=torch.float64)[..., None, None] * distance
    if mask is not None:
        s = s.masked_fill(~torch.tensor(mask), -torch.inf)
    if causal:
        s = s.masked_fill(torch.ones(L, S, dtype=torch.bool).triu(1), -torch.inf)
    out = torch.softmax(s, -1) @ tv
    out.backward(torch.tensor(dout))
    return [out.detach().numpy()] + [t.grad.numpy() for t in (tq, tk, tv)]


def slopes_of(*shape):
    """The slopes ALiBi's paper gives H heads (2^(-8 h / H)), spread over the leading dims."""
    h = np.arange(1, shape[-1] + 1)
    spread = 1 + np.arange(int(np.prod(shape[:-1]))).reshape(shape[:-1] + (1,)) / 4
    return (2.0 ** (-8.0 * h / shape[-1]) * spread).astype(np.float32)


@pytest.mark.parametrize("slope_shape", [(3,), (2, 3), (2, 1, 3)])
@pytest.mark.parametrize("causal, softcap, L, S", [(False, 0.0, 9, 9), (True, 0.0, 9, 9), (False, 0.0, 6, 11),
                                                   (False, 2.0, 11, 6), (True, 1.5, 7, 7)])
def test_reference_matches_the_formula(slope_shape, causal, softcap, L, S, rng):
    batch = (2, 1) if len(slope_shape) == 3 else (2,)
    q = rng.standard_normal(batch + (3, L, 8)) * 2
    k, v = (rng.standard_normal(batch + (3, S, 8)) * 2 for _ in range(2))
    dout = rng.standard_normal(batch + (3, L, 8))
    slopes = slopes_of(*slope_shape)
    want = torch_alibi(q, k, v, dout, slopes, causal=causal, softcap=softcap)
    kw = dict(is_causal=causal, softcap=softcap, alibi_slopes=slopes)
    got = [reference.attention(q, k, v, **kw)[0], *reference.attention_grads(q, k, v, dout, **kw)]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)


def test_zero_slopes_change_nothing_and_a_mask_still_hides(rng):
    q, k, v = (rng.standard_normal((2, 4, 5, 8)) for _ in range(3))
    plain = reference.attention(q, k, v)[0]
    np.testing.assert_array_equal(reference.attention(q, k, v, alibi_slopes=np.zeros(4, np.float32))[0], plain)
    mask = rng.random((5, 5)) > 0.3
    mask[:, 0] = True
    dout = rng.standard_normal(q.shape)
    slopes = slopes_of(4)
    want = torch_alibi(q, k, v, dout, slopes, mask=mask)
    got = [reference.attention(q, k, v, mask, alibi_slopes=slopes)[0],
           *reference.attention_grads(q, k, v, dout, mask, alibi_slopes=slopes)]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)


def test_public_api_runs_it_on_math_and_says_why_not_elsewhere(rng):
    q, k, v = (rng.standard_normal((2, 3, 7, 8)) for _ in range(3))
    slopes = slopes_of(2, 3)
    out = cusdpa.scaled_dot_product_attention(q, k, v, is_causal=True, alibi_slopes=slopes)
    np.testing.assert_allclose(out, reference.attention(q, k, v, is_causal=True, alibi_slopes=slopes)[0], rtol=1e-12)
    out, vjp = cusdpa.attention_vjp(q, k, v, alibi_slopes=slopes)
    dout = rng.standard_normal(out.shape)
    for g, w in zip(vjp(dout), reference.attention_grads(q, k, v, dout, alibi_slopes=slopes), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-12)
    half = [x.astype(np.float16) for x in (q, k, v)]
    explanation = cusdpa.explain(*half, alibi_slopes=slopes)
    assert explanation.chosen is cusdpa.Backend.MATH and "ALiBi" in str(explanation)


@pytest.mark.parametrize("slope_shape", [(2,), (2, 2)])
def test_varlen_aligns_it_per_sequence(slope_shape, rng):
    cu_q, cu_k = np.array([0, 4, 9], np.int32), np.array([0, 6, 9], np.int32)
    q = rng.standard_normal((9, 2, 8)) * 2
    k, v = (rng.standard_normal((9, 2, 8)) * 2 for _ in range(2))
    slopes = slopes_of(*slope_shape)
    out = cusdpa.varlen_attention(q, k, v, cu_q, cu_k, 5, 6, is_causal=True, causal_variant="lower_right",
                                  alibi_slopes=slopes)
    for b in range(2):
        rows, keys = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        want = reference.attention(q[rows].swapaxes(0, 1), k[keys].swapaxes(0, 1), v[keys].swapaxes(0, 1),
                                   is_causal=True, causal_variant="lower_right",
                                   alibi_slopes=slopes if slopes.ndim == 1 else slopes[b])[0]
        np.testing.assert_allclose(out[rows], want.swapaxes(0, 1), rtol=1e-12)


@pytest.mark.parametrize("bad, error, match", [
    (np.ones(3, np.float64), TypeError, "float32"),
    (np.ones(3, np.float16), TypeError, "float32"),
    (np.ones(4, np.float32), ValueError, "one slope per query head"),
    (np.ones((3, 3), np.float32), ValueError, "broadcast"),
    (np.array(1.0, np.float32), ValueError, "one slope per query head"),
    (np.float32(1.0), TypeError, "alibi_slopes"),
    ([1.0, 1.0, 1.0], TypeError, "alibi_slopes"),
])
def test_bad_slopes_are_refused(bad, error, match, rng):
    q = rng.standard_normal((2, 3, 4, 8))
    with pytest.raises(error, match=match):
        cusdpa.scaled_dot_product_attention(q, q, q, alibi_slopes=bad)


# ---- the torch bridge (CPU tensors run the reference through the same ops as CUDA tensors) -------------------

@pytest.mark.parametrize("slope_shape", [(3,), (2, 3)])
@pytest.mark.parametrize("compiled", [False, True])
def test_torch_entry_matches_the_formula_with_gradients(slope_shape, compiled, rng):
    import interop

    q = rng.standard_normal((2, 3, 6, 8)) * 2
    k, v = (rng.standard_normal((2, 3, 9, 8)) * 2 for _ in range(2))
    dout = rng.standard_normal(q.shape)
    slopes = slopes_of(*slope_shape)
    want = torch_alibi(q, k, v, dout, slopes, softcap=3.0)
    tq, tk, tv = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (q, k, v))
    ts = torch.tensor(slopes, requires_grad=True)
    fn = interop.scaled_dot_product_attention
    if compiled:
        fn = torch.compile(fn, backend="aot_eager", fullgraph=True)
    out = fn(tq, tk, tv, softcap=3.0, alibi_slopes=ts)
    out.backward(torch.tensor(dout))
    for g, w in zip([out.detach(), tq.grad, tk.grad, tv.grad], want, strict=True):
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-9, atol=1e-12)
    assert ts.grad is None  # the slopes get no gradient, as in FlashAttention


def test_torch_nested_inputs_align_it_per_sequence(rng):
    import interop

    lengths = (4, 7)
    slopes = slopes_of(2, 2)
    seqs = [[torch.tensor(rng.standard_normal((2, n, 8))) for n in lengths] for _ in range(3)]
    q, k, v = (torch.nested.nested_tensor([s.transpose(0, 1) for s in x], layout=torch.jagged).transpose(1, 2)
               for x in seqs)
    out = interop.scaled_dot_product_attention(q, k, v, is_causal=True, alibi_slopes=torch.tensor(slopes))
    for b, got in enumerate(out.unbind()):
        want = reference.attention(*(x[b].numpy() for x in seqs), is_causal=True, alibi_slopes=slopes[b])[0]
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)


@pytest.mark.parametrize("bad, error, match", [
    (lambda: np.ones(3, np.float32), TypeError, "torch.Tensor"),
    (lambda: torch.ones(3, dtype=torch.float64), TypeError, "float32"),
    (lambda: torch.ones(4), ValueError, "one slope per query head"),
    (lambda: torch.ones(3, device="meta"), ValueError, "meta"),
])
def test_torch_entry_refuses_bad_slopes(bad, error, match, rng):
    import interop

    q = torch.tensor(rng.standard_normal((2, 3, 4, 8)), dtype=torch.float32)
    with pytest.raises(error, match=match):
        interop.scaled_dot_product_attention(q, q, q, alibi_slopes=bad())
