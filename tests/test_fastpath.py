"""The eager fast path of the torch bridge (interop/fastpath.py) and the prepared launches under it
(cusdpa/launch.py): argument cells on the CPU; on the GPU, the fast path must give bit for bit what the
custom ops give (same kernels, same arguments), forward, backward and dropout, and step aside for
everything its plans do not cover."""
import numpy as np
import pytest

from cusdpa import launch


class FakeCupyArray:  # what _cell reads of a CuPy array
    class data:
        ptr = 0x7F00_0000_1230


@pytest.mark.parametrize("value, cell", [
    (np.int32(-1), 0xFFFF_FFFF),  # a 4-byte parameter: only the low bytes are read
    (np.int32(7), 7),
    (np.int64(-2), 2**64 - 2),
    (np.uint32(0xDEADBEEF), 0xDEADBEEF),  # seed words may come as NumPy or Python ints: the same cell
    (0xDEADBEEF, 0xDEADBEEF),
    (np.float32(1.5), int.from_bytes(np.float32(1.5).tobytes(), "little")),
    (np.uint64(0), 0),
    (0x7F00_0000_4560, 0x7F00_0000_4560),  # a raw device pointer
    (FakeCupyArray(), 0x7F00_0000_1230),
])
def test_argument_cells(value, cell):
    assert launch._cell(value) == cell


def test_slots_are_left_for_the_call():
    prepared = launch.Launch(None, (3, 4), (128,), 0, (launch.Slot("q"), np.int32(5), launch.Slot("seed_lo")))
    assert prepared.slots == ((0, "q"), (2, "seed_lo"))
    assert prepared.cells.tolist() == [0, 5, 0]
    assert prepared.offsets.tolist() == [0, 8, 16]


def test_oversized_argument_is_refused():
    with pytest.raises(TypeError, match="does not fit"):
        launch._cell(np.zeros(3, np.float64))


# ---- GPU ------------------------------------------------------------------------------------------------

def _torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA build of torch")
    return torch


def _inputs(torch, shape_q, shape_kv, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(*shape_q, device="cuda", dtype=dtype, generator=g).requires_grad_()
    k, v = (torch.randn(*shape_kv, device="cuda", dtype=dtype, generator=g).requires_grad_() for _ in range(2))
    return q, k, v


CASES = {
    "causal_bf16": dict(q=(2, 4, 300, 64), kv=(2, 4, 300, 64), dtype="bfloat16", kw=dict(is_causal=True)),
    "gqa_E128": dict(q=(1, 8, 257, 128), kv=(1, 2, 190, 128), dtype="float16", kw=dict(enable_gqa=True)),
    "E40_mma_sync": dict(q=(3, 2, 97, 40), kv=(3, 2, 131, 40), dtype="bfloat16",
                         kw=dict(is_causal=True, causal_variant="lower_right")),
    "window_dropout": dict(q=(2, 3, 200, 64), kv=(2, 3, 200, 64), dtype="float16",
                           kw=dict(window=(33, 4), dropout_p=0.2, scale=0.3)),
}


def _options(functional, kw):
    return functional.options(kw.get("dropout_p", 0.0), kw.get("is_causal", False), kw.get("scale"),
                              kw.get("enable_gqa", False), kw.get("causal_variant", "upper_left"), kw.get("window"),
                              None)


def _general(monkeypatch, ops, q, k, v, opts, dout):
    """out and (dq, dk, dv) through the ops with plans turned off: full validation, dispatch, CuPy views."""
    import torch

    from interop import plans

    with monkeypatch.context() as patched:
        patched.setattr(plans, "lookup", lambda *args, **kwargs: None)
        out, _ = ops.sdpa_fwd(q, k, v, None, *opts)
        return out.detach(), torch.autograd.grad(out, (q, k, v), dout)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(CASES))
def test_fast_path_is_bit_identical_to_the_general_path(name, rng, monkeypatch):
    torch = _torch_cuda()
    import interop
    from interop import functional, ops, plans

    case = CASES[name]
    dtype = getattr(torch, case["dtype"])
    q, k, v = _inputs(torch, case["q"], case["kv"], dtype, int(rng.integers(2**31)))
    kw = case["kw"]
    plans._plans.clear()
    for _ in range(2):  # the first call builds the plan, the second replays it
        torch.manual_seed(5)
        fast = interop.scaled_dot_product_attention(q, k, v, **kw)
    built = [p for p in plans._plans.values() if p is not None]
    assert len(built) == 1 and built[0].backward, "the repeated call must replay one cached FLASH plan"
    torch.manual_seed(5)
    opts = _options(functional, kw)  # draws the same dropout seed as the calls above
    dout = torch.randn_like(fast)
    slow, want = _general(monkeypatch, ops, q, k, v, opts, dout)
    assert torch.equal(fast, slow) and fast.stride() == slow.stride()  # both token-major
    got = torch.autograd.grad(fast, (q, k, v), dout)
    for g, w in zip(got, want):
        assert g.shape == w.shape and torch.equal(g, w)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["causal_bf16", "window_dropout"])
def test_ops_replay_plans_bit_identically(name, rng, monkeypatch):
    """The custom ops themselves (what a compiled graph calls) replay the plans, forward and backward."""
    torch = _torch_cuda()
    from interop import functional, ops, plans

    case = CASES[name]
    q, k, v = _inputs(torch, case["q"], case["kv"], getattr(torch, case["dtype"]), int(rng.integers(2**31)))
    opts = _options(functional, case["kw"])
    plans._plans.clear()
    out, lse = ops.sdpa_fwd(q, k, v, None, *opts)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    assert sorted(bool(p.backward) for p in plans._plans.values()) == [False, True]  # inference and training plans
    slow, want = _general(monkeypatch, ops, q, k, v, opts, dout)
    assert torch.equal(out.detach(), slow)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    # A backward op handed an out it cannot read in place (here a strided copy) takes the general path.
    strided = torch.empty(*out.shape[:-1], 2 * out.shape[-1], dtype=out.dtype, device="cuda")[..., ::2]
    strided.copy_(out.detach())
    training = next(p for p in plans._plans.values() if p.backward)
    assert not plans.backward_takes(training, q, dout, strided, lse)
    dq, dk, dv, _ = ops.sdpa_bwd(dout, q.detach(), k.detach(), v.detach(), None, strided, lse, *opts, False)
    for g, w in zip((dq, dk, dv), want):
        assert torch.equal(g, w)


@pytest.mark.gpu
def test_fast_path_on_a_side_stream_without_host_sync_or_grad():
    torch = _torch_cuda()
    import interop

    src = _inputs(torch, (2, 4, 513, 64), (2, 4, 513, 64), torch.bfloat16, 3)
    want = interop.scaled_dot_product_attention(*src, is_causal=True)
    want.backward(torch.ones_like(want))  # plans forward and backward
    want = want.detach()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    torch.cuda.set_sync_debug_mode("error")  # any torch-side synchronisation now raises
    try:
        with torch.cuda.stream(side):
            # Filled on the side stream just before the call: a kernel on any other stream races them.
            q, k, v = (torch.empty_like(x).copy_(x.detach()).requires_grad_() for x in src)
            out = interop.scaled_dot_product_attention(q, k, v, is_causal=True)
            out.backward(torch.ones_like(out))
            with torch.no_grad():
                again = interop.scaled_dot_product_attention(q, k, v, is_causal=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(out.detach(), want) and torch.equal(again, want) and not again.requires_grad
    assert torch.equal(q.grad, src[0].grad)
    with torch.inference_mode():
        assert torch.equal(interop.scaled_dot_product_attention(q, k, v, is_causal=True), want)


@pytest.mark.gpu
def test_fast_path_on_the_tensors_device(monkeypatch):
    """Plans replayed on cuda:1 while cuda:0 is current: outputs and gradients there, equal to the general path."""
    torch = _torch_cuda()
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    import interop
    from interop import functional, ops, plans

    with torch.cuda.device(1):
        q, k, v = _inputs(torch, (2, 4, 300, 64), (2, 4, 300, 64), torch.bfloat16, 7)
        dout = torch.randn(2, 4, 300, 64, device="cuda", dtype=torch.bfloat16)
    plans._plans.clear()
    with torch.cuda.device(0):
        for _ in range(2):  # the first call builds the plan, the second replays it
            fast = interop.scaled_dot_product_attention(q, k, v, is_causal=True)
        got = torch.autograd.grad(fast, (q, k, v), dout)
    assert any(p is not None and p.backward for p in plans._plans.values())
    with torch.cuda.device(1):
        slow, want = _general(monkeypatch, ops, q, k, v, _options(functional, dict(is_causal=True)), dout)
    assert fast.device == torch.device("cuda:1") and torch.equal(fast.detach(), slow)
    for g, w in zip(got, want):
        assert g.device == torch.device("cuda:1") and torch.equal(g, w)


@pytest.mark.gpu
def test_fast_path_steps_aside():
    """Masks, misaligned or non-collapsing inputs and fp32 take the ops (and stay right)."""
    torch = _torch_cuda()
    import interop
    from interop import fastpath, plans

    q, k, v = _inputs(torch, (2, 2, 64, 64), (2, 2, 64, 64), torch.float16, 4)
    assert not fastpath.applies(q, k, v, torch.ones(64, 64, dtype=torch.bool, device="cuda"))
    plans._plans.clear()
    base = torch.empty(2 * 2 * 64 * 64 + 1, device="cuda", dtype=torch.float16)
    shifted = base[1:].view(2, 2, 64, 64)  # 2-byte offset: cp.async needs 16-byte rows
    shifted.copy_(q.detach())
    got = interop.scaled_dot_product_attention(shifted, k.detach(), v.detach())
    assert list(plans._plans.values()) == [None]
    assert torch.equal(got, interop.scaled_dot_product_attention(q.detach(), k.detach(), v.detach()))
    plans._plans.clear()
    q32 = q.detach().float()
    interop.scaled_dot_product_attention(q32, q32, q32)
    assert all(p is None for p in plans._plans.values())
