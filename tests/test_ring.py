"""interop.ring_attention on CPU tensors over gloo: 2 and 4 ranks, each holding a chunk of the sequence,
against full attention on one process (values and the gradients of q, k, v), causal and not, GQA,
windows, both layouts; on the NumPy reference, and on EFFICIENT under Numba's CUDA simulator."""
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

CASES = [  # (options, layout, hq, hkv)
    (dict(), "contiguous", 4, 4),
    (dict(is_causal=True), "contiguous", 4, 2),
    (dict(is_causal=True), "zigzag", 4, 4),
    (dict(is_causal=True, window=(5, 0), scale=0.3), "zigzag", 2, 1),
    (dict(window=(3, 6)), "contiguous", 2, 2),
]


def _run(rank: int, world: int, init: str):
    import interop
    from interop.ring import positions, ring_attention

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        chunk = 6
        for n, (options, layout, hq, hkv) in enumerate(CASES):
            g = torch.Generator().manual_seed(n)  # every rank draws the same full tensors
            L = chunk * world
            q = torch.randn(2, hq, L, 8, generator=g, dtype=torch.float64, requires_grad=True)
            k, v = (torch.randn(2, hkv, L, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
            dout = torch.randn(2, hq, L, 8, generator=g, dtype=torch.float64)
            full = interop.scaled_dot_product_attention(q, k, v, enable_gqa=hq != hkv, **options)
            grads = torch.autograd.grad(full, (q, k, v), dout)
            mine = positions(rank, world, chunk, layout)
            local = [x.detach()[:, :, mine].clone().requires_grad_() for x in (q, k, v)]
            out = ring_attention(*local, enable_gqa=hq != hkv, layout=layout, **options)
            # lse is float32 (the contract), so merged chunks agree to ~1e-7 even in float64
            torch.testing.assert_close(out, full.detach()[:, :, mine], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"case {n} rank {rank} out: {m}")
            out.backward(dout[:, :, mine])
            for name, x, want in zip("qkv", local, grads):
                torch.testing.assert_close(x.grad, want[:, :, mine], rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"case {n} rank {rank} d{name}: {m}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_ring_attention_equals_full_attention(world, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_run, args=(world, f"file://{tmp_path / 'rendezvous'}"), nprocs=world, join=True)


def test_ring_attention_needs_a_process_group():
    from cusdpa.errors import ArgumentError
    from interop.ring import ring_attention

    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    q = torch.zeros(1, 1, 4, 8)
    with pytest.raises(ArgumentError, match="process group"):
        ring_attention(q, q, q)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_causal_steps_need_no_mask(layout):
    """Causal pieces are all or nothing or the diagonal: every step runs mask-free (FLASH end to end on GPUs),
    and zigzag gives every rank the same number of visible key positions."""
    from interop.ring import _pairs, segments

    world, chunk = 4, 8
    work = []
    for rank in range(world):
        mine, seen = segments(rank, world, chunk, layout), 0
        for s in range(world):
            for p in _pairs(mine, segments((rank - s) % world, world, chunk, layout), True, None, "cpu"):
                assert p.mask is None
                n, m = p.qs.stop - p.qs.start, p.ks.stop - p.ks.start
                seen += n * (n + 1) // 2 if p.causal else n * m
        work.append(seen)
    assert (len(set(work)) == 1) == (layout == "zigzag"), work


def _run_efficient(rank: int, world: int, init: str):
    """Ring attention on EFFICIENT (Numba's CUDA simulator: this process started with NUMBA_ENABLE_CUDASIM=1),
    fp32, against full attention on MATH: its backward takes the merged out and lse as FLASH's does."""
    import interop
    import kernels_numba
    from cusdpa import Backend
    from cusdpa.verify.check import simulator_tiles
    from interop.ring import positions, ring_attention

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        chunk = 4
        for n, (options, layout, hq, hkv) in enumerate((CASES[1], CASES[3])):
            g = torch.Generator().manual_seed(n)
            L = chunk * world
            q = torch.randn(1, hq, L, 8, generator=g, requires_grad=True)
            k, v = (torch.randn(1, hkv, L, 8, generator=g, requires_grad=True) for _ in range(2))
            dout = torch.randn(1, hq, L, 8, generator=g)
            full = interop.scaled_dot_product_attention(q, k, v, enable_gqa=hq != hkv, backend=Backend.MATH, **options)
            grads = torch.autograd.grad(full, (q, k, v), dout)
            mine = positions(rank, world, chunk, layout)
            local = [x.detach()[:, :, mine].clone().requires_grad_() for x in (q, k, v)]
            with kernels_numba.configured(simulator_tiles()):  # the backward runs in this thread on CPU tensors
                out = ring_attention(*local, enable_gqa=hq != hkv, layout=layout, backend=Backend.EFFICIENT,
                                     **options)
                out.backward(dout[:, :, mine])
            torch.testing.assert_close(out, full.detach()[:, :, mine], rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"case {n} rank {rank} out: {m}")
            for name, x, want in zip("qkv", local, grads):
                torch.testing.assert_close(x.grad, want[:, :, mine], rtol=1e-4, atol=1e-5,
                                           msg=lambda m: f"case {n} rank {rank} d{name}: {m}")
    finally:
        dist.destroy_process_group()


def test_ring_attention_runs_on_efficient(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    pytest.importorskip("numba")
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "1")  # read by the spawned ranks when they first import numba
    mp.spawn(_run_efficient, args=(2, f"file://{tmp_path / 'rendezvous'}"), nprocs=2, join=True)


def test_pairs_are_decided_without_materialising_long_chunks():
    """Each (query piece, key piece) pair is classified from its offsets, as the position-by-position rule
    says (checked on small pieces), so a million-token causal ring makes no mask at all."""
    import random

    from interop.ring import _pair, _pairs, _visible, segments

    rand = random.Random(0)
    for _ in range(400):
        qg, kg, qn, kn = rand.randrange(40), rand.randrange(40), rand.randrange(1, 12), rand.randrange(1, 12)
        if rand.random() < 0.2:
            kg, kn = qg, qn
        causal = rand.random() < 0.6
        window = None if rand.random() < 0.4 else (rand.randrange(-1, 15), rand.randrange(-1, 15))
        seen = _visible(torch.arange(qg, qg + qn), torch.arange(kg, kg + kn), causal, window)
        p = _pair((0, qg, qn), (0, kg, kn), causal, window, "cpu")
        if not seen.any():
            assert p is None
        elif p.causal:
            assert p.mask is None and torch.equal(seen, torch.ones_like(seen).tril())
        elif p.mask is None:
            assert bool(seen.all())
        else:
            assert torch.equal(p.mask, seen)
    world, per_rank = 8, 1 << 17
    for rank in range(world):
        for s in range(world):
            pairs = _pairs(segments(rank, world, per_rank, "zigzag"),
                           segments((rank - s) % world, world, per_rank, "zigzag"), True, None, "cpu")
            assert all(p.mask is None for p in pairs)
