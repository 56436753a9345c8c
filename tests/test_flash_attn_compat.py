"""interop.flash_attn_compat: FlashAttention's API (layouts, bottom-right causal, window_size with -1,
softmax_scale, GQA by head counts, softcap, ALiBi, return_attn_probs) against FlashAttention's semantics written
out in float64 torch ops, and the KV-cache torch twin against the array API. CPU tensors (the reference)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import cusdpa  # noqa: E402
from interop import flash_attn_compat as fa  # noqa: E402
from interop import kv_cache_attention  # noqa: E402


def attention_ref(q, k, v, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, scale=None):
    """FlashAttention's semantics in float64: (B, L, H, D) layout, key heads repeated for GQA, the diagonal
    bottom-right (query i at key i + S - L), out and lse (B, H, L)."""
    q, k, v = (x.double() for x in (q, k, v))
    L, S, H = q.shape[1], k.shape[1], q.shape[2]
    k, v = (x.repeat_interleave(H // x.shape[2], dim=2) for x in (k, v))
    s = torch.einsum("blhd,bshd->bhls", q, k) * (scale or q.shape[-1] ** -0.5)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    d = torch.arange(S)[None, :] - torch.arange(L)[:, None] - (S - L)  # key j relative to the query's diagonal
    if alibi_slopes is not None:
        s = s - alibi_slopes.double().reshape(-1, H, 1, 1) * d.abs()
    left, right = window_size
    right = 0 if causal else right
    hidden = torch.zeros(L, S, dtype=torch.bool)
    if left >= 0:
        hidden |= d < -left
    if right >= 0:
        hidden |= d > right
    s = s.masked_fill(hidden, -torch.inf)
    lse = torch.logsumexp(s, -1)
    return torch.einsum("bhls,bshd->blhd", torch.softmax(s, -1), v), lse


def _qkv(rng, B=2, L=7, S=11, H=4, Hk=2, D=8, grad=False):
    return [torch.tensor(rng.standard_normal(shape), requires_grad=grad)
            for shape in ((B, L, H, D), (B, S, Hk, D), (B, S, Hk, D))]


@pytest.mark.parametrize("kw", [dict(), dict(causal=True), dict(causal=True, window_size=(3, -1)),
                                dict(window_size=(2, 4)), dict(softcap=1.5, softmax_scale=0.3),
                                dict(causal=True, alibi_slopes="per batch")])
def test_flash_attn_func_matches_flash_attentions_semantics(kw, rng):
    q, k, v = _qkv(rng, grad=True)
    if kw.get("alibi_slopes") == "per batch":
        kw = {**kw, "alibi_slopes": torch.rand(2, 4, dtype=torch.float32)}
    out, lse, probs = fa.flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    ref_kw = {("scale" if n == "softmax_scale" else n): x for n, x in kw.items()}
    want, want_lse = attention_ref(q, k, v, **ref_kw)
    assert out.shape == q.shape and lse.shape == (2, 4, 7) and probs is None
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, want_lse.float())  # float32, as FlashAttention's
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    want_grads = torch.autograd.grad(want, (q, k, v), dout)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_packed_forms_equal_the_unpacked_call(rng):
    q, k, v = _qkv(rng, Hk=4)
    want = fa.flash_attn_func(q, k, v, causal=True)
    torch.testing.assert_close(fa.flash_attn_qkvpacked_func(torch.stack([q, k[:, :7], v[:, :7]], 2), causal=True),
                               fa.flash_attn_func(q, k[:, :7], v[:, :7], causal=True))
    torch.testing.assert_close(fa.flash_attn_kvpacked_func(q, torch.stack([k, v], 2), causal=True), want)
    assert fa.flash_attn_func(q, k, v, deterministic=True).shape == q.shape


def test_varlen_forms_run_each_sequence_alone(rng):
    lengths_q, lengths_k = (3, 5, 1), (6, 5, 4)
    cu_q = torch.tensor(np.cumsum((0,) + lengths_q), dtype=torch.int32)
    cu_k = torch.tensor(np.cumsum((0,) + lengths_k), dtype=torch.int32)
    q = torch.tensor(rng.standard_normal((sum(lengths_q), 4, 8)))
    k, v = (torch.tensor(rng.standard_normal((sum(lengths_k), 2, 8))) for _ in range(2))
    out, lse, _ = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 6, causal=True, window_size=(2, -1),
                                            return_attn_probs=True)
    assert lse.shape == (4, sum(lengths_q))
    for b in range(3):
        rows, keys = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        want, want_lse = attention_ref(q[None, rows], k[None, keys], v[None, keys], causal=True, window_size=(2, -1))
        torch.testing.assert_close(out[rows], want[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(lse[:, rows], want_lse[0].float())
    kv = torch.stack([k, v], 1)
    torch.testing.assert_close(fa.flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, 5, 6, causal=True),
                               fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 6, causal=True))
    qkv = torch.stack([q, q, q], 1)
    torch.testing.assert_close(fa.flash_attn_varlen_qkvpacked_func(qkv, cu_q, 5),
                               fa.flash_attn_varlen_func(q, q, q, cu_q, cu_q, 5, 5))
    with pytest.raises(NotImplementedError, match="block_table"):
        fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 6, block_table=torch.zeros(3, 1, dtype=torch.int32))


@pytest.mark.parametrize("paged", [False, True])
def test_with_kvcache_writes_in_place_and_matches_the_array_api(paged, rng):
    B, new = 3, 2
    if paged:
        k_cache, v_cache = (torch.tensor(rng.standard_normal((12, 4, 2, 8))) for _ in range(2))
        table = torch.tensor(rng.permutation(12)[:9].reshape(3, 3), dtype=torch.int32)
    else:
        k_cache, v_cache = (torch.tensor(rng.standard_normal((B, 12, 2, 8))) for _ in range(2))
        table = None
    seqlens = torch.tensor([4, 0, 9], dtype=torch.int32)
    q = torch.tensor(rng.standard_normal((B, new, 4, 8)))
    k, v = (torch.tensor(rng.standard_normal((B, new, 2, 8))) for _ in range(2))
    arrays = [x.numpy().copy() for x in (k_cache, v_cache)]
    want, want_lse = cusdpa.kv_cache_attention(q.numpy(), *arrays, seqlens.numpy(), k.numpy(), v.numpy(),
                                               block_table=None if table is None else table.numpy(), is_causal=True,
                                               return_lse=True)
    out, lse = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, block_table=table,
                                          causal=True, return_softmax_lse=True)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-12)
    np.testing.assert_allclose(lse.numpy(), want_lse, rtol=1e-12)
    for cache, array in zip((k_cache, v_cache), arrays):
        np.testing.assert_array_equal(cache.numpy(), array)  # the same cells written in place
    with pytest.raises(NotImplementedError, match="rotary"):
        fa.flash_attn_with_kvcache(q, k_cache, v_cache, rotary_cos=torch.zeros(4, 4))
    with pytest.raises(ValueError, match="together"):
        kv_cache_attention(q, k_cache, v_cache, seqlens, key=k)
