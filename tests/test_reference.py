"""The NumPy reference against PyTorch's CPU SDPA and autograd in float64, an independent oracle."""
import numpy as np
import pytest

from cusdpa import philox, reference

torch = pytest.importorskip("torch")
F = torch.nn.functional

TOL = dict(rtol=1e-9, atol=1e-11)


def allowed_mask(L, S, causal, lower_right, window):
    """Visibility written out independently of the reference: query i vs key j on the aligned diagonal."""
    i = np.arange(L)[:, None] + (S - L if lower_right else 0)
    j = np.arange(S)[None, :]
    ok = np.ones((L, S), bool)
    if causal:
        ok &= j <= i
    if window is not None:
        left, right = window
        if left >= 0:
            ok &= j >= i - left
        if right >= 0:
            ok &= j <= i + right
    return ok


def torch_oracle(q, k, v, dout, *, bool_mask=None, float_mask=None, scale=None, gqa=False):
    """PyTorch float64 SDPA with one combined float mask; returns out, lse, dq, dk, dv, d(float_mask)."""
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    tm = None if float_mask is None else torch.tensor(float_mask, requires_grad=True)
    mask = tm
    if bool_mask is not None:
        tb = torch.tensor(bool_mask)
        mask = torch.where(tb, tm if tm is not None else torch.zeros((), dtype=torch.float64), -torch.inf)
    out = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask, scale=scale, enable_gqa=gqa)
    out.backward(torch.tensor(dout))
    rep = tq.shape[-3] // tk.shape[-3]
    s = (tq @ tk.repeat_interleave(rep, -3).transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)
    if mask is not None:
        s = s + mask
    lse = torch.logsumexp(s, -1)
    grads = [t.grad.numpy() for t in (tq, tk, tv)] + ([tm.grad.numpy()] if tm is not None else [])
    return out.detach().numpy(), lse.detach().numpy(), grads


MASK_SHAPES = {  # as functions of (batch, H, L, S)
    "full": lambda b, h, L, S: b + (h, L, S),
    "per_batch_key_padding": lambda b, h, L, S: b + (1, 1, S),
    "per_head": lambda b, h, L, S: (h, L, S),
    "2d": lambda b, h, L, S: (L, S),
    "key_only": lambda b, h, L, S: (S,),
    "query_only": lambda b, h, L, S: (L, 1),
}
CASES = [
    # (batch, Hq, Hkv, L, S, E, Ev, mask_kind, mask_shape, causal, window)
    ((2,), 3, 3, 17, 23, 8, 8, None, None, None, None),
    ((2,), 2, 2, 97, 31, 40, 24, "bool", "full", None, None),
    ((3,), 4, 2, 13, 29, 16, 16, "float", "per_batch_key_padding", None, None),
    ((), 8, 2, 33, 33, 72, 40, "float", "per_head", "upper_left", None),
    ((2, 3), 2, 1, 19, 11, 8, 5, "bool", "2d", "lower_right", None),
    ((2,), 2, 2, 11, 19, 8, 8, "float", "key_only", "lower_right", (3, 0)),
    ((1,), 4, 4, 25, 25, 16, 16, None, None, None, (2, 5)),
    ((2,), 6, 3, 21, 14, 24, 8, "bool", "query_only", "upper_left", (4, -1)),
    ((2,), 1, 1, 1, 37, 8, 8, "float", "full", None, None),
    ((2,), 2, 2, 37, 1, 8, 8, None, None, "lower_right", None),
    ((), 2, 1, 40, 9, 8, 12, None, None, "lower_right", (-1, 2)),
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_forward_and_gradients_match_torch(case, rng):
    batch, hq, hkv, L, S, E, Ev, mask_kind, mask_shape, causal, window = case
    q = rng.standard_normal(batch + (hq, L, E))
    k = rng.standard_normal(batch + (hkv, S, E))
    v = rng.standard_normal(batch + (hkv, S, Ev))
    scale = float(rng.uniform(0.05, 0.5))
    mask = None
    if mask_kind is not None:
        shape = MASK_SHAPES[mask_shape](batch, hq, L, S)
        mask = rng.random(shape) > 0.25 if mask_kind == "bool" else rng.standard_normal(shape)
        if mask_kind == "float":  # some -inf entries: masked positions written as a float mask
            mask = np.where(rng.random(shape) < 0.1, -np.inf, mask)
    kw = dict(is_causal=causal is not None, causal_variant=causal or "upper_left", window=window, scale=scale,
              enable_gqa=hq != hkv)
    out, lse = reference.attention(q, k, v, mask, **kw)
    dout = rng.standard_normal(out.shape)
    grads = reference.attention_grads(q, k, v, dout, mask, **kw)

    bool_mask = None
    if causal is not None or window is not None:
        bool_mask = allowed_mask(L, S, causal is not None, causal == "lower_right", window)
    if mask_kind == "bool":
        bool_mask = mask if bool_mask is None else (bool_mask & mask)
    t_out, t_lse, t_grads = torch_oracle(q, k, v, dout, bool_mask=bool_mask,
                                         float_mask=mask if mask_kind == "float" else None, scale=scale,
                                         gqa=hq != hkv)
    np.testing.assert_allclose(out, t_out, **TOL)
    np.testing.assert_allclose(lse, t_lse, rtol=2e-7, atol=1e-7)  # lse is float32 by contract
    assert len(grads) == len(t_grads)
    for g, tg in zip(grads, t_grads):
        np.testing.assert_allclose(g, tg, **TOL)


def test_window_equals_explicit_mask(rng):
    L, S = 31, 45
    q, k, v = rng.standard_normal((2, L, 16)), rng.standard_normal((2, S, 16)), rng.standard_normal((2, S, 16))
    for lower_right in (False, True):
        for window in [(0, 0), (5, 2), (-1, 3), (7, -1)]:
            variant = "lower_right" if lower_right else "upper_left"
            got, lse = reference.attention(q, k, v, window=window, causal_variant=variant)
            want, want_lse = reference.attention(q, k, v, allowed_mask(L, S, False, lower_right, window))
            np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(lse, want_lse)


@pytest.mark.filterwarnings("ignore:Lower right causal bias")
def test_lower_right_matches_torch_causal_lower_right(rng):
    from torch.nn.attention.bias import causal_lower_right

    for L, S in [(7, 19), (19, 7), (16, 16)]:
        q, k, v = rng.standard_normal((2, 3, L, 8)), rng.standard_normal((2, 3, S, 8)), rng.standard_normal((2, 3, S, 8))
        got, _ = reference.attention(q, k, v, is_causal=True, causal_variant="lower_right")
        want = F.scaled_dot_product_attention(*map(torch.tensor, (q, k, v)), attn_mask=causal_lower_right(L, S))
        np.testing.assert_allclose(got, want.numpy(), **TOL)


def test_fully_masked_rows_give_zero_out_minus_inf_lse_zero_grads(rng):
    q, k, v = rng.standard_normal((2, 6, 8)), rng.standard_normal((2, 9, 8)), rng.standard_normal((2, 9, 4))
    mask = rng.random((2, 6, 9)) > 0.3
    mask[0, 2] = False
    mask[1, 5] = False
    out, lse = reference.attention(q, k, v, mask)
    dq, dk, dv = reference.attention_grads(q, k, v, np.ones_like(out), mask)
    for h, i in [(0, 2), (1, 5)]:
        assert np.all(out[h, i] == 0) and lse[h, i] == -np.inf and np.all(dq[h, i] == 0)
    assert np.isfinite(out).all() and np.isfinite(dk).all() and np.isfinite(dv).all()


def test_nan_where_nothing_may_see_it_does_not_leak(rng):
    L, S = 8, 12
    q, k, v = rng.standard_normal((2, 2, L, 8)), rng.standard_normal((2, 2, S, 8)), rng.standard_normal((2, 2, S, 8))
    pad = np.ones((2, 1, 1, S), bool)
    pad[0, ..., 9:] = False  # key padding of batch 0
    pad[1, ..., 5:7] = False
    clean = reference.attention(q, k, v, pad)
    dout = rng.standard_normal(clean[0].shape)
    clean_grads = reference.attention_grads(q, k, v, dout, pad)
    k2, v2 = k.copy(), v.copy()
    k2[0, :, 9:] = np.nan
    v2[0, :, 9:] = np.inf
    k2[1, :, 5:7] = np.inf
    v2[1, :, 5:7] = np.nan
    dirty = reference.attention(q, k2, v2, pad)
    for a, b in zip(dirty, clean):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(reference.attention_grads(q, k2, v2, dout, pad), clean_grads):
        np.testing.assert_array_equal(a[np.isfinite(b)], b[np.isfinite(b)])
        assert np.isfinite(a[:, :, :5]).all()
    # a NaN float-mask value at a position the bool/causal structure hides is selected out, not added
    fmask = rng.standard_normal((L, S))
    fmask_nan = np.where(allowed_mask(L, S, True, False, None), fmask, np.nan)
    np.testing.assert_array_equal(reference.attention(q, k, v, fmask_nan, is_causal=True)[0],
                                  reference.attention(q, k, v, fmask, is_causal=True)[0])
    # query rows that see nothing may hold NaN too
    q3 = q.copy()
    rows = np.ones((L, S), bool)
    rows[3] = False
    q3[:, :, 3] = np.nan
    out3 = reference.attention(q3, k, v, rows)[0]
    assert np.isfinite(out3).all() and np.all(out3[:, :, 3] == 0)
    assert np.isfinite(np.concatenate([g.ravel() for g in reference.attention_grads(q3, k, v, dout, rows)])).all()


@pytest.mark.parametrize("L,S", [(0, 5), (5, 0), (0, 0)])
def test_empty_lengths(L, S, rng):
    q, k, v = rng.standard_normal((2, L, 8)), rng.standard_normal((2, S, 8)), rng.standard_normal((2, S, 3))
    out, lse = reference.attention(q, k, v, is_causal=True)
    assert out.shape == (2, L, 3) and lse.shape == (2, L)
    assert np.all(out == 0) and np.all(lse == -np.inf)
    dq, dk, dv = reference.attention_grads(q, k, v, np.ones_like(out))
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert not dq.any() and not dk.any() and not dv.any()


def test_rank2_and_broadcast_batch_dims(rng):
    q, k, v = rng.standard_normal((5, 8)), rng.standard_normal((7, 8)), rng.standard_normal((7, 3))
    out, lse = reference.attention(q, k, v)
    assert out.shape == (5, 3) and lse.shape == (5,)
    np.testing.assert_allclose(out, F.scaled_dot_product_attention(*map(torch.tensor, (q, k, v))).numpy(), **TOL)
    # key/value shared across a batch dim of query: gradients sum over the broadcast
    q4 = rng.standard_normal((3, 2, 5, 8))
    k4, v4 = rng.standard_normal((1, 2, 7, 8)), rng.standard_normal((1, 2, 7, 3))
    out4, _ = reference.attention(q4, k4, v4)
    dout = rng.standard_normal(out4.shape)
    t_out, _, t_grads = torch_oracle(q4, k4, v4, dout)
    np.testing.assert_allclose(out4, t_out, **TOL)
    for g, tg in zip(reference.attention_grads(q4, k4, v4, dout), t_grads):
        assert g.shape == tg.shape
        np.testing.assert_allclose(g, tg, **TOL)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_low_precision_inputs_return_their_dtype(dtype, rng):
    q, k, v = (rng.standard_normal((2, 9, 16)).astype(dtype) for _ in range(3))
    out, lse = reference.attention(q, k, v)
    assert out.dtype == np.dtype(dtype) and lse.dtype == np.float32
    want, _, _ = torch_oracle(*(x.astype(np.float64) for x in (q, k, v)), np.zeros((2, 9, 16)))
    # accumulated in float64, so the only error left is the final rounding to the input dtype
    half_ulp = 0.5 * np.spacing(np.abs(want).astype(dtype)).astype(np.float64)
    assert np.all(np.abs(out.astype(np.float64) - want) <= half_ulp * (1 + 1e-9))


def test_float32_accumulation_on_request(rng):
    q, k, v = (rng.standard_normal((2, 33, 16)) for _ in range(3))
    got, _ = reference.attention(q, k, v, accum=np.float32)
    want, _ = reference.attention(q, k, v)
    err = np.abs(got - want).max()
    assert 0 < err < 1e-5


# ---- dropout -------------------------------------------------------------------------------------------

def _dropout_problem(rng, L=12, S=10, H=3):
    q, k = rng.standard_normal((2, H, L, 8)), rng.standard_normal((2, H, S, 8))
    return q, k, np.broadcast_to(np.eye(S), (2, H, S, S)).copy()  # v = I makes out the attention matrix A


def test_dropout_applies_the_philox_mask_exactly(rng):
    q, k, v = _dropout_problem(rng)
    p, seed = 0.3, int(rng.integers(0, 2**63))
    A, lse = reference.attention(q, k, v, dropout_p=p, seed=(seed, 7), is_causal=True)
    P, lse0 = reference.attention(q, k, v, is_causal=True)
    keep = philox.keep_mask(seed, 7, np.arange(6), 12, 10, p).reshape(2, 3, 12, 10)
    np.testing.assert_allclose(A, np.where(keep, P / (1 - p), 0), rtol=1e-13, atol=0)
    np.testing.assert_array_equal(lse, lse0)  # logsumexp is taken before dropout


def test_dropout_is_deterministic_per_seed_and_seeds_differ(rng):
    q, k, v = _dropout_problem(rng)
    a = reference.attention(q, k, v, dropout_p=0.5, seed=11)[0]
    np.testing.assert_array_equal(a, reference.attention(q, k, v, dropout_p=0.5, seed=11)[0])
    assert (a != reference.attention(q, k, v, dropout_p=0.5, seed=12)[0]).mean() > 0.2
    assert (a != reference.attention(q, k, v, dropout_p=0.5, seed=(11, 1))[0]).mean() > 0.2


def test_dropout_keep_fraction_within_binomial_bounds(rng):
    q, k, v = _dropout_problem(rng, L=40, S=48, H=4)
    p = float(rng.uniform(0.1, 0.9))
    A = reference.attention(q, k, v, dropout_p=p, seed=int(rng.integers(0, 2**63)))[0]
    n = A.size
    kept = np.count_nonzero(A)
    assert abs(kept - n * (1 - p)) < 6 * np.sqrt(n * p * (1 - p))


def test_dropout_is_unbiased(rng):
    q, k = rng.standard_normal((1, 2, 6, 8)), rng.standard_normal((1, 2, 7, 8))
    v = rng.standard_normal((1, 2, 7, 5))
    p, n = 0.4, 400
    want = reference.attention(q, k, v)[0]
    outs = np.stack([reference.attention(q, k, v, dropout_p=p, seed=s)[0] for s in range(n)])
    se = outs.std(0) / np.sqrt(n)
    assert np.all(np.abs(outs.mean(0) - want) <= 5 * se + 1e-12)


def test_dropout_vjp_against_finite_differences(rng):
    q, k, v = (rng.standard_normal((1, 2, 5, 4)) for _ in range(3))
    mask = rng.standard_normal((5, 5))
    kw = dict(dropout_p=0.3, seed=1234, is_causal=True)
    dout = rng.standard_normal((1, 2, 5, 4))
    grads = reference.attention_grads(q, k, v, dout, mask, **kw)
    args = [q, k, v, mask]
    eps = 1e-6
    for n, x in enumerate(args):
        direction = rng.standard_normal(x.shape)
        plus = [a + eps * direction if m == n else a for m, a in enumerate(args)]
        minus = [a - eps * direction if m == n else a for m, a in enumerate(args)]
        fd = (np.sum(reference.attention(*plus[:3], plus[3], **kw)[0] * dout)
              - np.sum(reference.attention(*minus[:3], minus[3], **kw)[0] * dout)) / (2 * eps)
        assert np.isclose(np.sum(grads[n] * direction), fd, rtol=1e-6, atol=1e-8), n


def test_dropout_one_gives_zeros(rng):
    q, k, v = (rng.standard_normal((2, 5, 4)) for _ in range(3))
    out, lse = reference.attention(q, k, v, dropout_p=1.0, seed=3)
    assert not out.any() and np.isfinite(lse).all()
    assert not any(g.any() for g in reference.attention_grads(q, k, v, np.ones_like(out), dropout_p=1.0, seed=3))


# ---- varlen ----------------------------------------------------------------------------------------------

def test_varlen_matches_dense_per_sequence(rng):
    from cusdpa import problem

    lens_q, lens_k = [5, 0, 9, 3], [7, 4, 9, 0]
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    hq, hkv = 4, 2
    q = rng.standard_normal((cu_q[-1], hq, 8))
    k = rng.standard_normal((cu_k[-1], hkv, 8))
    v = rng.standard_normal((cu_k[-1], hkv, 6))
    kw = dict(is_causal=True, causal_variant="lower_right", window=(3, -1), enable_gqa=True)
    pr = problem.from_varlen(q, k, v, cu_q, cu_k, 9, 9, problem.Options(**kw))
    out, lse = reference.forward(pr)
    dout = rng.standard_normal(out.shape)
    dq, dk, dv = reference.backward(pr, dout)
    for b in range(4):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        per = [x.swapaxes(0, 1) for x in (q[qs], k[ks], v[ks])]
        o, l = reference.attention(*per, **kw)
        np.testing.assert_allclose(out[qs], o.swapaxes(0, 1), **TOL)
        np.testing.assert_array_equal(lse[:, qs], l)
        g = reference.attention_grads(*per, dout[qs].swapaxes(0, 1), **kw)
        for got, want in zip((dq[qs], dk[ks], dv[ks]), g):
            np.testing.assert_allclose(got, want.swapaxes(0, 1), **TOL)


def test_varlen_dropout_counts_batch_heads_per_sequence(rng):
    from cusdpa import problem

    lens = [4, 6]
    cu = np.array([0, 4, 10], np.int32)
    H, S = 2, 6
    q, k = rng.standard_normal((10, H, 8)), rng.standard_normal((10, H, 8))
    v = np.zeros((10, H, S))
    for b, (start, n) in enumerate(zip(cu[:-1], lens)):
        v[start:start + n] = np.eye(S)[:n, None, :]  # out row = attention weights over the sequence
    pr = problem.from_varlen(q, k, v, cu, cu, 6, 6, problem.Options(dropout_p=0.5), 99)
    A, _ = reference.forward(pr)
    P, _ = reference.forward(problem.from_varlen(q, k, v, cu, cu, 6, 6))
    for b, n in enumerate(lens):
        keep = philox.keep_mask(99, 0, np.arange(b * H, b * H + H), n, n, 0.5)  # (H, n, n)
        rows = slice(cu[b], cu[b + 1])
        want = np.where(keep.swapaxes(0, 1), P[rows, :, :n] * 2, 0)
        np.testing.assert_allclose(A[rows, :, :n], want, rtol=1e-13, atol=0)
