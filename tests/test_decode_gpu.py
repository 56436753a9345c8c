"""The tensor-core split-KV kernels (kernels_cuda/flash_decode.cu) behind cusdpa.kv_cache_attention on CuPy
fp16/bf16 arrays, on the GPU: contiguous and paged caches, new tokens appended on the device, several query
rows per kv head, causal, windows, softcap and ALiBi, uneven and empty sequences, long ones split over many
CTAs, and stale NaN in the cache's unused cells, judged per sequence by the harness (test_kv_cache.judged)."""
import numpy as np
import pytest

from test_kv_cache import judged

import cusdpa

pytestmark = pytest.mark.gpu


def _bf16():
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


CASES = {  # name -> (E, Ev, Hq, Hkv, Lq, new, paged, lengths, capacity, options)
    "decode_gqa": (128, 128, 32, 8, 1, 0, False, [3000, 1, 0, 777], 4096, dict()),
    "decode_append_paged": (128, 128, 16, 4, 1, 1, True, [100, 1, 4000, 515], 4096, dict(is_causal=True)),
    "chunk_causal_window": (64, 64, 8, 2, 4, 4, True, [60, 9, 2047, 300], 2048, dict(is_causal=True, window=(37, 0))),
    "softcap_alibi": (128, 128, 8, 8, 2, 2, False, [1500, 31, 8, 2], 2048, dict(softcap=5.0, alibi=True)),
    "wide_head": (256, 256, 4, 1, 1, 0, True, [9000, 17, 256, 4096], 9216, dict(is_causal=True)),
    "different_dims": (192, 128, 16, 2, 2, 1, False, [700, 5, 1, 64], 1024, dict(is_causal=True)),
    "odd_dim_multi_query": (40, 40, 6, 2, 5, 0, False, [50, 6, 1000, 3], 1024, dict(is_causal=True)),
    "one_sequence_long": (128, 128, 32, 8, 1, 0, True, [32768], 32768, dict()),
    # blocks of 24 positions: a tile straddles blocks, so each key's address is gathered (the non-affine copy)
    # (each sequence holds at least its new token: a length of 1 is the new token alone)
    "paged_small_blocks": (64, 64, 8, 2, 1, 1, True, [100, 37, 1, 250], 264, dict(is_causal=True, window=(50, 0))),
}
BLOCK_SIZE = {"paged_small_blocks": 24}  # positions per block of a paged case (default 256)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", list(CASES))
def test_kv_cache_on_the_decode_kernels(name, dtype):
    _check_case(name, dtype)


def _check_case(name, dtype):
    """Case ``name`` run on the decode kernels and judged; its (out, lse)."""
    import cupy

    from cusdpa.backends.flash import decode

    E, Ev, hq, hkv, lq, new, paged, lengths, capacity, options = CASES[name]
    rng = np.random.default_rng(len(name))
    B = len(lengths)
    np_dtype = np.dtype(dtype) if dtype == "float16" else _bf16()
    block = BLOCK_SIZE.get(name, 256)
    if paged:
        per_seq = capacity // block
        table = rng.permutation(B * per_seq + 3)[:B * per_seq].reshape(B, per_seq).astype(np.int32)
        shape = (B * per_seq + 3, block, hkv)
        rows = None
    else:
        table, shape, rows = None, (B + 1, capacity, hkv), rng.permutation(B + 1)[:B].astype(np.int32)
    k_host = rng.standard_normal(shape + (E,)).astype(np_dtype)
    v_host = rng.standard_normal(shape + (Ev,)).astype(np_dtype)
    seqlens = np.array(lengths, np.int32) - new
    for b in range(B):  # stale cells past every sequence hold NaN: none may reach an output
        for cache in (k_host, v_host):
            if table is None:
                cache[rows[b], lengths[b]:] = np.nan
            else:
                for p in range(lengths[b], capacity, 1):
                    cache[table[b, p // block], p % block] = np.nan
    q_host = rng.standard_normal((B, lq, hq, E)).astype(np_dtype)
    kn = rng.standard_normal((B, new, hkv, E)).astype(np_dtype) if new else None
    vn = rng.standard_normal((B, new, hkv, Ev)).astype(np_dtype) if new else None
    kw = dict(options)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = cupy.asarray((rng.random((B, hq)) / 4).astype(np.float32))
    dev = {k: None if v is None else cupy.asarray(v) for k, v in dict(q=q_host, k=k_host, v=v_host, kn=kn, vn=vn,
                                                                         table=table, rows=rows).items()}
    built = decode.build.cache_info().misses + decode.build.cache_info().hits
    out, lse = cusdpa.kv_cache_attention(
        dev["q"], dev["k"], dev["v"], cupy.asarray(seqlens), dev["kn"], dev["vn"], block_table=dev["table"],
        cache_batch_idx=dev["rows"], return_lse=True, **kw)
    assert decode.build.cache_info().misses + decode.build.cache_info().hits == built + 1, "not on the decode kernels"
    # the new tokens landed where the host puts them
    k_after, v_after = dev["k"].get(), dev["v"].get()
    row_of = np.arange(B) if rows is None else rows
    for b in range(B):
        for n in range(new):
            p = seqlens[b] + n
            cell = (row_of[b], p) if table is None else (table[b, p // block], p % block)
            np.testing.assert_array_equal(k_after[cell].view(np.uint16), kn[b, n].view(np.uint16))
            np.testing.assert_array_equal(v_after[cell].view(np.uint16), vn[b, n].view(np.uint16))
    assert out.dtype == np_dtype and out.shape == (B, lq, hq, Ev)
    failures = judged(dev["q"], dev["k"], dev["v"], lengths, table, row_of, out, lse, **kw)
    assert not failures, "\n".join(failures)
    return out, lse


# decode.TMA_BLOCKS takes head dims of whole 64-column boxes and pages of whole blocks (8 warps x 16 keys)
TMA_CASES = [name for name in CASES if name not in ("odd_dim_multi_query", "paged_small_blocks")]


@pytest.mark.parametrize("tma", [0, 1])
@pytest.mark.parametrize("name", TMA_CASES)
def test_blocks_by_tma_and_tiles_by_cp_async(name, tma, monkeypatch):
    """On sm_90 both copies of the split kernel: decode.TMA_BLOCKS (the default), a producer warp loading the CTA's
    blocks of keys by TMA into a shared ring, V rows of keys outside a split's seen keys zeroed once landed (the
    cases' stale cells hold NaN), and each warp's cp.async ring: judged, and the build asked for was the one
    taken."""
    from cusdpa.backends.flash import decode, sources

    if sources.compute_capability(0) < 90:
        pytest.skip("TMA copies need compute capability 9.0")
    mapped = []
    real = decode._cache_map
    monkeypatch.setattr(decode, "_cache_map", lambda *args: mapped.append(args) or real(*args))
    monkeypatch.setattr(decode, "TMA_BLOCKS", tma)
    decode.build.cache_clear()
    try:
        _check_case(name, "bfloat16")
    finally:
        decode.build.cache_clear()
    assert len(mapped) == 2 * tma, "not the copy asked for"


@pytest.mark.parametrize("name", ["one_sequence_long", "decode_gqa", "wide_head"])
def test_the_splits_merge_in_batches_with_the_same_bits(name, monkeypatch):
    """decode.MERGE_UNROLL: the splits' merge loading 8 partial outputs a batch (the default), 3 (batches cut
    short at most split counts) or 32 gives the same out and lse, bit for bit, each judged; cases of 8 to 128
    splits a (sequence, kv head)."""
    import cupy

    from cusdpa.backends.flash import decode

    results = []
    for unroll in (8, 3, 32):
        monkeypatch.setattr(decode, "MERGE_UNROLL", unroll)
        decode.build.cache_clear()  # (plans are kept per signature, not per constant)
        results.append(_check_case(name, "bfloat16"))
    decode.build.cache_clear()
    for out, lse in results[1:]:
        assert cupy.array_equal(out, results[0][0]) and cupy.array_equal(lse, results[0][1], equal_nan=True)


@pytest.mark.parametrize("keep", [0, 1])
def test_torch_decode_steps_replay_a_plan_and_capture_in_a_cuda_graph(keep, monkeypatch):
    """interop.kv_cache_attention's decode plan: a repeated call gives the first one's result; lengths as an int
    are checked against the capacity; a decode step (append one token, attend) captured in a CUDA graph and
    replayed with new lengths written into its static tensors equals the eager step (the graph holds the split
    kernel's arrival memset, also where eager calls keep their workspace: ``keep``, decode.KEEP_WORKSPACE)."""
    torch = pytest.importorskip("torch")
    import interop
    from cusdpa.backends.flash import decode
    from interop import kv_cache

    monkeypatch.setattr(kv_cache, "_plans", {})
    monkeypatch.setattr(kv_cache, "_kept", {})
    monkeypatch.setattr(decode, "KEEP_WORKSPACE", keep)

    g = torch.Generator(device="cuda").manual_seed(0)
    B, S, hq, hkv, E = 3, 1024, 8, 2, 64

    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)

    q, k_cache, v_cache, k_new, v_new = randn(B, 1, hq, E), randn(B, S, hkv, E), randn(B, S, hkv, E), \
        randn(B, 1, hkv, E), randn(B, 1, hkv, E)
    seqlens = torch.tensor([5, 600, 1000], dtype=torch.int32, device="cuda")
    first = interop.kv_cache_attention(q, k_cache, v_cache, seqlens, is_causal=True)
    again = interop.kv_cache_attention(q, k_cache, v_cache, seqlens, is_causal=True)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    with pytest.raises(ValueError, match="capacity"):
        interop.kv_cache_attention(q, k_cache, v_cache, S, k_new, v_new)

    def step():
        return interop.kv_cache_attention(q, k_cache, v_cache, seqlens, k_new, v_new, is_causal=True)

    caches = (k_cache.clone(), v_cache.clone())
    want = step()  # eager, at lengths 5, 600, 1000 (+1)
    k_cache.copy_(caches[0])
    v_cache.copy_(caches[1])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm: the plan and its kernels exist before capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = step()
    k_cache.copy_(caches[0])
    v_cache.copy_(caches[1])
    graph.replay()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    seqlens.copy_(torch.tensor([6, 601, 1001], dtype=torch.int32))  # the next step, same graph
    graph.replay()
    expected = step()  # eager on the state the replay left: it rewrites the same token where the replay did
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_kept_decode_workspace_serves_calls_of_any_size_and_stays_zeroed(monkeypatch):
    """decode.KEEP_WORKSPACE: the torch front end keeps the splits' workspace and arrival counts per stream, and
    issues no memset: calls of different sizes (many splits and few, one kv head and eight) alternating on one
    stream give the bits of the calls with a fresh workspace each, and leave the counts zeroed (the merging CTA
    resets its count)."""
    torch = pytest.importorskip("torch")
    import interop
    from cusdpa.backends.flash import decode
    from interop import kv_cache

    monkeypatch.setattr(kv_cache, "_plans", {})
    monkeypatch.setattr(kv_cache, "_kept", {})
    g = torch.Generator(device="cuda").manual_seed(1)

    def problem(B, S, hq, hkv, E):
        def randn(*shape):
            return torch.randn(*shape, device="cuda", dtype=torch.float16, generator=g)

        lengths = torch.randint(1, S + 1, (B,), device="cuda", dtype=torch.int32, generator=g)
        return randn(B, 1, hq, E), randn(B, S, hkv, E), randn(B, S, hkv, E), lengths

    # smallest first: the kept buffers grow, replaced after use (counts 6 -> 8)
    problems = [problem(3, 1024, 8, 2, 64), problem(2, 8192, 4, 1, 128), problem(1, 32768, 32, 8, 128)]
    want = []
    for args in problems:
        monkeypatch.setattr(decode, "KEEP_WORKSPACE", 0)
        want.append(interop.kv_cache_attention(*args, return_lse=True))
    monkeypatch.setattr(decode, "KEEP_WORKSPACE", 1)
    for _ in range(3):
        for args, (out, lse) in zip(problems, want):
            got_out, got_lse = interop.kv_cache_attention(*args, return_lse=True)
            torch.testing.assert_close(got_out, out, rtol=0, atol=0)
            torch.testing.assert_close(got_lse, lse, rtol=0, atol=0, equal_nan=True)
    (workspace, counts), = kv_cache._kept.values()
    assert counts.numel() == 8 and workspace.numel() > 0
    torch.cuda.synchronize()
    assert int(counts.count_nonzero()) == 0
