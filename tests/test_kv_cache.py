"""KV-cache attention (cusdpa.kv_cache_attention and its torch twin): new tokens written in place, then
attention over each sequence's cached positions, against the reference run per sequence on the cache
contents the call should have left."""
import numpy as np
import pytest

import cusdpa
from cusdpa import problem, reference

B, HQ, HKV, E, EV = 3, 4, 2, 8, 16


def _caches(rng, paged: bool):
    """(k_cache, v_cache, block_table): a contiguous (B + 1, 24, Hkv, E) cache, or the same capacity in 6 blocks
    of 4 positions per sequence, shuffled over 20 blocks."""
    if not paged:
        return rng.standard_normal((B + 1, 24, HKV, E)), rng.standard_normal((B + 1, 24, HKV, EV)), None
    table = rng.permutation(20)[:B * 6].reshape(B, 6).astype(np.int32)
    return rng.standard_normal((20, 4, HKV, E)), rng.standard_normal((20, 4, HKV, EV)), table


def _sequence(cache, b, n, table, batch_idx):
    """Positions [0, n) of sequence b of a cache (NumPy or CuPy), (n, H, D)."""
    if table is None:
        return cache[int(batch_idx[b]), :n]
    xp = problem.array_module(cache, "cache")
    return xp.concatenate([cache[int(blk)] for blk in table[b]])[:n]


def judged(q, k_cache, v_cache, lengths, table, batch_idx, out, lse, **kw) -> list[str]:
    """Failures of kv_cache_attention's (out (B, Lq, Hq, Ev), lse (B, Hq, Lq)) on the cache contents the call
    left, judged per sequence by the one harness (cusdpa.verify: the float64 reference, and PyTorch at the
    inputs' precision on their device): sequence b is dense attention of q[b] over its lengths[b] cached
    positions, causal and window aligned lower-right, with its ALiBi slopes."""
    from cusdpa.verify import harness

    options = problem.Options(is_causal=kw.get("is_causal", False), scale=kw.get("scale"), enable_gqa=True,
                              causal_variant="lower_right", window=kw.get("window"), softcap=kw.get("softcap", 0.0))
    slopes = kw.get("alibi_slopes")
    failures = []
    for b in range(q.shape[0]):
        k, v = (_sequence(c, b, int(lengths[b]), table, batch_idx).swapaxes(0, 1) for c in (k_cache, v_cache))
        pr = problem.from_dense(q[b].swapaxes(0, 1), k, v, None, options,
                                alibi_slopes=None if slopes is None else slopes[b])
        _, bad = harness.judged(harness.expect(pr), {"out": out[b].swapaxes(0, 1), "lse": lse[b]})
        failures += [f"sequence {b} ({int(lengths[b])} keys): {m}" for m in bad]
    return failures


def _expected(q, k_cache, v_cache, lengths, table, batch_idx, **kw):
    """The reference per sequence of the cache's contents: (out (B, Lq, Hq, Ev), lse (B, Hq, Lq))."""
    outs, lses = [], []
    for b in range(q.shape[0]):
        k = _sequence(k_cache, b, lengths[b], table, batch_idx).swapaxes(0, 1)
        v = _sequence(v_cache, b, lengths[b], table, batch_idx).swapaxes(0, 1)
        slopes = kw.get("alibi_slopes")
        o, lse = reference.attention(q[b].swapaxes(0, 1), k, v, enable_gqa=True, causal_variant="lower_right",
                                     **{**kw, "alibi_slopes": None if slopes is None else slopes[b]})
        outs.append(o.swapaxes(0, 1))
        lses.append(lse)
    return np.stack(outs), np.stack(lses)


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("new", [0, 1, 3])
@pytest.mark.parametrize("options", [dict(), dict(is_causal=True), dict(is_causal=True, window=(5, 0)),
                                     dict(softcap=2.0, alibi_slopes=True)])
def test_arrays_write_then_attend(paged, new, options, rng):
    k_cache, v_cache, table = _caches(rng, paged)
    lq = max(new, 1)
    q = rng.standard_normal((B, lq, HQ, E))
    seqlens = np.array([5, 0, 17], np.int32)
    key, value = (rng.standard_normal((B, new, HKV, d)) for d in (E, EV)) if new else (None, None)
    batch_idx = None if paged else np.array([2, 0, 3], np.int32)
    kw = dict(options)
    if kw.pop("alibi_slopes", False):
        kw["alibi_slopes"] = (rng.random((B, HQ)) / 2).astype(np.float32)
    before_k, before_v = k_cache.copy(), v_cache.copy()
    out, lse = cusdpa.kv_cache_attention(q, k_cache, v_cache, seqlens, key, value, block_table=table,
                                         cache_batch_idx=batch_idx, return_lse=True, **kw)
    rows = np.arange(B) if batch_idx is None else batch_idx
    for b in range(B):  # the new tokens are in the cache, nothing else moved
        for cache, before, x in ((k_cache, before_k, key), (v_cache, before_v, value)):
            got = _sequence(cache, b, seqlens[b] + new, table, rows)
            want = _sequence(before, b, seqlens[b] + new, table, rows).copy()
            if new:
                want[seqlens[b]:] = x[b]
            np.testing.assert_array_equal(got, want)
    untouched = np.ones(k_cache.shape[:2], bool)
    for b in range(B):
        n = seqlens[b] + new
        if table is None:
            untouched[rows[b], seqlens[b]:n] = False
        else:
            p = np.arange(seqlens[b], n)
            untouched[table[b, p // 4], p % 4] = False
    np.testing.assert_array_equal(k_cache[untouched], before_k[untouched])
    want_out, want_lse = _expected(q, k_cache, v_cache, seqlens + new, table, rows, **kw)
    assert out.shape == (B, lq, HQ, EV) and lse.shape == (B, HQ, lq)
    np.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12)


def test_default_lengths_are_the_whole_cache(rng):
    k_cache, v_cache, _ = _caches(rng, False)
    q = rng.standard_normal((B + 1, 2, HQ, E))
    out = cusdpa.kv_cache_attention(q, k_cache, v_cache, is_causal=True)
    for b in range(B + 1):
        want = reference.attention(q[b].swapaxes(0, 1), k_cache[b].swapaxes(0, 1), v_cache[b].swapaxes(0, 1),
                                   is_causal=True, causal_variant="lower_right", enable_gqa=True)[0]
        np.testing.assert_allclose(out[b], want.swapaxes(0, 1), rtol=1e-12)


@pytest.mark.parametrize("change, error, match", [
    (dict(cache_seqlens=np.array([5, 0, 25])), ValueError, "capacity"),
    (dict(cache_seqlens=np.array([5, 0])), ValueError, "cache_seqlens.shape"),
    (dict(cache_seqlens=np.array([5.0, 0, 1])), TypeError, "integer"),
    (dict(cache_batch_idx=np.array([0, 1, 4])), ValueError, "cache_batch_idx"),
    (dict(block_table=np.zeros((3, 2), np.int32)), ValueError, "exclude each other"),
    (dict(key="only"), ValueError, "together"),
])
def test_bad_calls_are_refused(change, error, match, rng):
    k_cache, v_cache, _ = _caches(rng, False)
    q = rng.standard_normal((B, 1, HQ, E))
    args = dict(cache_seqlens=np.array([5, 0, 1], np.int32), cache_batch_idx=np.array([0, 1, 2], np.int32))
    args.update(change)
    if args.get("key") == "only":
        args["key"] = rng.standard_normal((B, 1, HKV, E))
    with pytest.raises(error, match=match):
        cusdpa.kv_cache_attention(q, k_cache, v_cache, **args)


def test_decode_example_agrees_with_pytorch_on_the_cpu():
    """examples/decode_gpt.py: greedy tokens through the KV cache equal PyTorch's over a static cache."""
    import importlib.util
    import pathlib

    pytest.importorskip("torch")
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "decode_gpt.py"
    spec = importlib.util.spec_from_file_location("decode_gpt", path)
    decode_gpt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(decode_gpt)
    assert decode_gpt.main(["--device", "cpu", "--new-tokens", "4"]) == 0


def test_decode_plans_are_told_apart_by_every_argument_that_shapes_them(monkeypatch):
    """The torch front end's decode signature (interop.kv_cache._decode) is written out argument by argument: a
    plan is made once per distinct call, and again whenever a tensor's shape, strides, dtype or kind of lengths,
    or an option, differs (here on CPU tensors, the plan builder counted instead of run)."""
    torch = pytest.importorskip("torch")
    from interop import kv_cache

    made = []
    monkeypatch.setattr(kv_cache, "flash_decode_plan", lambda *args: made.append(args))
    monkeypatch.setattr(kv_cache, "_plans", {})
    q = torch.zeros(2, 1, 8, 64, dtype=torch.bfloat16)
    cache = torch.zeros(2, 32, 2, 64, dtype=torch.bfloat16)
    lengths = torch.zeros(2, dtype=torch.int32)
    table = torch.zeros(2, 4, dtype=torch.int32)
    calls = [dict(), dict(cache_seqlens=lengths), dict(cache_seqlens=5), dict(cache_seqlens=lengths, block_table=table),
             dict(cache_seqlens=lengths, block_table=table[:, :3].contiguous()), dict(cache_batch_idx=lengths),
             dict(key=q[:, :, :2], value=q[:, :, :2]), dict(is_causal=True), dict(scale=0.5), dict(window=(4, 0)),
             dict(softcap=2.0), dict(alibi_slopes=torch.ones(8)), dict(alibi_slopes=torch.ones(2, 8))]
    for kw in calls + calls:  # each a second time: no new plan
        args = dict(cache_seqlens=None, key=None, value=None, block_table=None, cache_batch_idx=None, is_causal=False,
                    scale=None, window=None, softcap=0.0, alibi_slopes=None) | kw
        assert kv_cache._decode(q, cache, cache, **args) is None  # the builder gave None: the general path
    assert len(made) == len(calls)
    kv_cache._decode(q, cache.transpose(1, 2).contiguous().transpose(1, 2), cache, None, None, None, None, None,
                     False, None, None, 0.0, None)  # other strides
    kv_cache._decode(q.half(), cache.half(), cache.half(), None, None, None, None, None, False, None, None, 0.0, None)
    assert len(made) == len(calls) + 2
    with pytest.raises(TypeError, match="float32"):  # checked when the plan of a signature is made
        kv_cache._decode(q, cache, cache, None, None, None, None, None, False, None, None, 0.0, torch.ones(8).double())
    # int32 vectors that are not contiguous, or not int32, take the general path without a plan
    assert kv_cache._decode(q, cache, cache, lengths.long(), None, None, None, None, False, None, None, 0.0,
                            None) is None
    assert kv_cache._decode(q, cache, cache, None, None, None, table[:, ::2], None, False, None, None, 0.0,
                            None) is None
    assert len(made) == len(calls) + 2
