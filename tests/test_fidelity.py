"""Drop-in fidelity: where PyTorch's SDPA takes an argument, cusdpa takes it and gives PyTorch's answer
(zero head dims, heads and ranks that broadcast, key and value heads of different counts under
enable_gqa, autocast); where PyTorch refuses one, cusdpa refuses it with an error PyTorch's callers
catch (RuntimeError) and Python's callers catch (ValueError / TypeError). CPU tensors run the reference;
the ``gpu`` cases run the CUDA kernels against PyTorch on the same device."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch.nn import functional as F  # noqa: E402

import cusdpa  # noqa: E402
import interop  # noqa: E402
from interop import ops  # noqa: E402

# (query, key, value) shapes and enable_gqa: each broadcasts or groups in PyTorch.
HEAD_CASES = {
    "rank-2 query, 4-D keys": ((3, 4), (2, 5, 6, 4), (2, 5, 6, 7), False),
    "one query head": ((1, 1, 3, 4), (1, 8, 6, 4), (1, 8, 6, 7), False),
    "one key head, all value heads": ((1, 8, 3, 4), (1, 1, 6, 4), (1, 8, 6, 7), False),
    "one key/value head without enable_gqa": ((2, 4, 3, 4), (2, 1, 6, 4), (2, 1, 6, 5), False),
    "key and value head counts differ": ((2, 8, 3, 4), (2, 2, 6, 4), (2, 4, 6, 7), True),
    "3-D query against 4-D keys": ((4, 3, 4), (2, 4, 6, 4), (2, 4, 6, 4), False),
}
ZERO_CASES = {
    "E=0": ((1, 2, 3, 0), (1, 2, 4, 0), (1, 2, 4, 5), {}),
    "E=0 causal": ((2, 2, 5, 0), (2, 2, 5, 0), (2, 2, 5, 3), {"is_causal": True}),
    "E=0 float mask": ((2, 2, 5, 0), (2, 2, 5, 0), (2, 2, 5, 3), {"mask": (5, 5)}),
    "Ev=0": ((1, 2, 3, 4), (1, 2, 4, 4), (1, 2, 4, 0), {}),
}


def _leaves(rng, shapes, dtype=torch.float64, device="cpu"):
    return [torch.tensor(rng.standard_normal(s), dtype=dtype, device=device).requires_grad_() for s in shapes]


def _values_and_grads(fn, leaves, mask=None, **kw):
    out = fn(*leaves, mask, **kw)
    dout = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
    grads = torch.autograd.grad(out, leaves, dout, allow_unused=True) if out.numel() else [None] * len(leaves)
    return out.detach(), grads


def _assert_matches_pytorch(rng, shapes, mask_shape=None, device="cpu", dtype=torch.float64, **kw):
    leaves = _leaves(rng, shapes, dtype, device)
    mask = None if mask_shape is None else torch.tensor(rng.standard_normal(mask_shape), dtype=dtype, device=device)
    got, got_grads = _values_and_grads(interop.scaled_dot_product_attention, leaves, mask, **kw)
    # PyTorch's math backend in float64 is the yardstick on either device: exact enough to judge bf16 too.
    want, want_grads = _values_and_grads(F.scaled_dot_product_attention, [x.detach().double().requires_grad_()
                                                                          for x in leaves],
                                         None if mask is None else mask.double(), **kw)
    tol = {} if dtype == torch.float64 else dict(atol=2e-2, rtol=2e-2)
    assert got.shape == want.shape and got.dtype == dtype
    torch.testing.assert_close(got.double(), want, **tol)
    for g, w in zip(got_grads, want_grads):
        if w is not None:
            torch.testing.assert_close(g.double(), w, **tol)


@pytest.mark.parametrize("name", HEAD_CASES)
def test_heads_and_ranks_broadcast_and_group_as_in_pytorch(rng, name):
    *shapes, gqa = HEAD_CASES[name]
    _assert_matches_pytorch(rng, shapes, enable_gqa=gqa)
    _assert_matches_pytorch(rng, shapes, enable_gqa=gqa, is_causal=True)


@pytest.mark.parametrize("name", HEAD_CASES)
def test_numpy_api_takes_the_same_heads(rng, name):
    *shapes, gqa = HEAD_CASES[name]
    arrays = [rng.standard_normal(s) for s in shapes]
    out, vjp = cusdpa.attention_vjp(*arrays, enable_gqa=gqa)
    dout = rng.standard_normal(out.shape)
    leaves = [torch.tensor(a, requires_grad=True) for a in arrays]
    want = F.scaled_dot_product_attention(*leaves, enable_gqa=gqa)
    want.backward(torch.tensor(dout))
    np.testing.assert_allclose(out, want.detach().numpy(), rtol=1e-10, atol=1e-12)
    for got, leaf in zip(vjp(dout), leaves):
        assert got.shape == tuple(leaf.shape)
        np.testing.assert_allclose(got, leaf.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ZERO_CASES)
def test_zero_head_dims_as_in_pytorch(rng, name):
    *shapes, kw = ZERO_CASES[name]
    kw = dict(kw)
    _assert_matches_pytorch(rng, shapes, mask_shape=kw.pop("mask", None), **kw)


def test_zero_head_dim_in_the_numpy_api_weighs_visible_keys_equally(rng):
    q, k, v = rng.standard_normal((2, 3, 0)), rng.standard_normal((2, 4, 0)), rng.standard_normal((2, 4, 5))
    out = cusdpa.scaled_dot_product_attention(q, k, v, is_causal=True)
    for i in range(3):
        np.testing.assert_allclose(out[:, i], v[:, :i + 1].mean(1), rtol=1e-12)


def test_autocast_casts_inputs_as_pytorch_does(rng):
    q, k, v = _leaves(rng, [(2, 2, 5, 8)] * 3, torch.float32)
    mask = torch.tensor(rng.standard_normal((5, 5)), dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = interop.scaled_dot_product_attention(q, k.bfloat16(), v, mask)  # mixed dtypes: autocast settles them
        want = F.scaled_dot_product_attention(q, k.bfloat16(), v, mask)
        with interop.sdpa_override():
            routed = F.scaled_dot_product_attention(q, k, v, mask)
        op_out, op_lse = ops.sdpa_fwd(q, k, v, mask, None, 0.0, False, None, False, "upper_left", None, 0.0,
                                      False, None, "math")
    assert got.dtype == want.dtype == routed.dtype == op_out.dtype == torch.bfloat16
    for out in (got, routed, op_out):
        torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=2e-2)
    grads = torch.autograd.grad(got.float().sum(), (q, k, v))
    assert [g.dtype for g in grads] == [torch.float32] * 3  # through the casts, back to the leaves' dtype
    assert all(torch.isfinite(g).all() for g in grads)


def test_autocast_leaves_float64_alone_as_pytorch_does(rng):
    q = _leaves(rng, [(1, 2, 4, 8)])[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert interop.scaled_dot_product_attention(q, q, q).dtype == F.scaled_dot_product_attention(q, q, q).dtype


BAD_TORCH = [
    # (description, query, key, value, kwargs, exception type, message fragment)
    ("dtypes differ", (2, 4, 8), (2, 4, 8), (2, 4, 8), {"k_dtype": torch.float16}, TypeError, "key.dtype"),
    ("head dims differ", (2, 4, 8), (2, 4, 6), (2, 4, 8), {}, ValueError, "differ in head dim"),
    ("heads neither broadcast nor group", (3, 4, 8), (2, 4, 8), (2, 4, 8), {}, ValueError, "neither broadcast"),
    ("is_causal float", (2, 4, 8), (2, 4, 8), (2, 4, 8), {"is_causal": 0.25}, TypeError, "must be a bool"),
    ("is_causal str", (2, 4, 8), (2, 4, 8), (2, 4, 8), {"is_causal": "no"}, TypeError, "must be a bool"),
    ("scale bool", (2, 4, 8), (2, 4, 8), (2, 4, 8), {"scale": True}, TypeError, "must be a real number"),
    ("dropout bool", (2, 4, 8), (2, 4, 8), (2, 4, 8), {"dropout_p": True}, TypeError, "must be a real number"),
    ("enable_gqa int", (2, 4, 8), (2, 4, 8), (2, 4, 8), {"enable_gqa": 1}, TypeError, "must be a bool"),
]


@pytest.mark.parametrize("desc,qs,ks,vs,kw,exc,fragment", BAD_TORCH, ids=[b[0] for b in BAD_TORCH])
def test_torch_errors_are_runtime_errors_too(rng, desc, qs, ks, vs, kw, exc, fragment):
    kw = dict(kw)
    k_dtype = kw.pop("k_dtype", torch.float32)
    q, v = torch.randn(qs), torch.randn(vs)
    k = torch.randn(ks, dtype=k_dtype)
    for caught in (exc, RuntimeError):  # Python's kind of error, and PyTorch's
        with pytest.raises(caught, match=fragment):
            interop.scaled_dot_product_attention(q, k, v, **kw)


def test_a_flash_attn_call_ported_positionally_to_varlen_fails_loudly(rng):
    # flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal)
    q = rng.standard_normal((7, 2, 8))
    cu = np.array([0, 3, 7], np.int32)
    with pytest.raises(RuntimeError, match="is_causal=0.25 must be a bool"):
        cusdpa.varlen_attention(q, q, q, cu, cu, 4, 4, 0.0, 0.25, True)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["rank-2 query, 4-D keys", "one query head", "key and value head counts differ"])
def test_heads_broadcast_on_the_gpu(rng, name):
    *shapes, gqa = HEAD_CASES[name]
    shapes = [tuple(s[:-1]) + (64,) for s in shapes]  # a head dim the kernels take
    _assert_matches_pytorch(rng, shapes, device="cuda", dtype=torch.bfloat16, enable_gqa=gqa, is_causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ZERO_CASES)
def test_zero_head_dims_on_the_gpu(rng, name):
    *shapes, kw = ZERO_CASES[name]
    kw = dict(kw)
    _assert_matches_pytorch(rng, shapes, mask_shape=kw.pop("mask", None), device="cuda", dtype=torch.bfloat16, **kw)


@pytest.mark.gpu
def test_autocast_on_the_gpu(rng):
    q, k, v = _leaves(rng, [(2, 4, 64, 64)] * 3, torch.float32, "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = interop.scaled_dot_product_attention(q, k, v, is_causal=True)
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    assert [g.dtype for g in torch.autograd.grad(got.float().sum(), (q, k, v))] == [torch.float32] * 3


def test_autocast_under_torch_compile(rng):
    q, k, v = _leaves(rng, [(1, 2, 5, 8)] * 3, torch.float32)

    def block(q, k, v):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return interop.scaled_dot_product_attention(q, k, v, is_causal=True)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    got, want = compiled(q, k, v), block(q, k, v)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)
