"""Plans (cusdpa/backends/plans.py) and the prepared launches under them (cusdpa/backends/launch.py):
argument cells on the CPU; on the GPU, a replayed plan must give bit for bit what the general path gives
(same kernels, same arguments), forward, backward and dropout, through the torch bridge and for CuPy
callers, and calls that plans do not cover must take the general path."""
import ctypes

import numpy as np
import pytest

from cusdpa.backends import launch


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
    assert prepared.slots == ((0, launch.SLOTS.index("q")), (2, launch.SLOTS.index("seed_lo")))
    assert prepared.cells == (0, 5, 0)
    assert launch.values(q=7, seed_lo=3) == tuple({"q": 7, "seed_lo": 3}.get(name) for name in launch.SLOTS)


def test_recorded_cells_that_move_with_an_operand_become_its_slot():
    """EFFICIENT's plans (cusdpa.backends.efficient.plan) compare two recordings of the same launches at
    different stand-in addresses: a cell that moves with one operand is its slot, a cell that does not move
    is a constant (even where it equals an operand's address in one recording), and a cell that moves but
    holds no operand (an address inside one) means no plan; the launch keeps its dynamic shared memory."""
    from cusdpa.backends import efficient

    first_values, second_values = {"q": 1 << 40, "seed_lo": 11}, {"q": (1 << 40) + (1 << 36), "seed_lo": 12}
    first = [(5, (2, 3, 1), (128, 1, 1), [1 << 40, 64, 11, 1 << 40], 60000)]
    second = [(5, (2, 3, 1), (128, 1, 1), [(1 << 40) + (1 << 36), 64, 12, 1 << 40], 60000)]
    (made,) = efficient._slotted(first, second, first_values, second_values)
    assert made.fn.ptr == 5 and made.grid == (2, 3) and made.block == (128,) and made.smem == 60000
    assert made.slots == ((0, launch.SLOTS.index("q")), (2, launch.SLOTS.index("seed_lo")))
    assert made.cells == (0, 64, 0, 1 << 40)
    inside = [(5, (2, 3, 1), (128, 1, 1), [(1 << 40) + (1 << 36) + 256, 64, 12, 1 << 40], 60000)]
    assert efficient._slotted(first, inside, first_values, second_values) is None
    other_grid = [(5, (2, 4, 1), (128, 1, 1), second[0][3], 60000)]
    assert efficient._slotted(first, other_grid, first_values, second_values) is None
    other_smem = [(5, (2, 3, 1), (128, 1, 1), second[0][3], 0)]
    assert efficient._slotted(first, other_smem, first_values, second_values) is None


def test_zero_words_memset_their_slot_on_the_calls_stream(monkeypatch):
    calls = []

    class Runtime:
        @staticmethod
        def memsetAsync(ptr, value, size, stream):
            calls.append((ptr, value, size, stream))

    monkeypatch.setattr(launch._Driver, "runtime", Runtime)
    launch.ZeroWords("arrivals", 6)(launch.values(arrivals=0x1000, q=5), 77)
    assert calls == [(0x1000, 0, 24, 77)]


def test_decode_plans_fill_each_slot_by_name(monkeypatch):
    """DecodePlan.run writes its value tuple by position (no dict on the decode path): each pointer must land
    in the slot of its name, the workspace's three parts included; with arrival counts the caller keeps, they
    are the slot's and the memset of the counts is not issued."""
    from cusdpa.backends.flash import decode

    seen = []
    monkeypatch.setattr(decode, "run", lambda launches, values, stream, device: seen.append((launches, values, stream,
                                                                                           device)))
    memset, split = launch.ZeroWords("arrivals", 2), object()
    plan = decode.DecodePlan(3, (memset, split), (split,), (1, 1, 8, 64), (1, 8, 1), part_floats=1000, ml_floats=40,
                             arrival_words=2, capacity=4096, new=1)
    assert plan.workspace_floats == 1042
    plan.run(9, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 4096)
    plan.run(9, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 4096, arrivals=8192)
    (launches, values, stream, device), (kept_launches, kept_values, _, _) = seen
    assert (stream, device) == (9, 3)
    assert values == launch.values(q=11, k=12, v=13, table=14, seqlens=15, slopes=16, key=17, value=18, fixed_len=19,
                                   o=20, lse=21, o_part=4096, ml_part=4096 + 4000, arrivals=4096 + 4160)
    assert launches == (memset, split) and kept_launches == (split,)
    assert kept_values == values[:-1] + (8192,) and launch.SLOTS[-1] == "arrivals"


@pytest.mark.parametrize("limit", [227 * 1024, 163 * 1024, 99 * 1024])  # sm_90, sm_80, sm_86 / sm_89
def test_decode_ctas_fit_the_device_shared_memory(limit):
    """decode.warps: at every head dim pair the decode kernels take, the split CTA's shared memory (Q, two stages,
    TMA's alignment) fits the device's opt-in limit, with as many warps as fit (eight where they do) and whole
    blocks for TMA's boxes (at most 256 keys)."""
    from cusdpa.backends.flash import decode

    for E in range(8, 257, 8):
        for Ev in (E, 128):
            w = decode.warps(E, Ev, limit)
            assert decode.smem_bytes(E, Ev, w, True) <= limit, (E, Ev, w)
            assert w == decode.WARPS or decode.smem_bytes(E, Ev, 2 * w, True) > limit, (E, Ev, w)
            assert w >= 2 and w * decode.TILE <= 256, (E, Ev, w)


def test_a_plan_not_ready_yet_is_tried_again_then_given_up():
    from cusdpa.backends import plans

    made = []

    def not_yet():
        made.append(1)
        return plans.NOT_YET

    signature = ("test", object())
    for n in range(plans.TRIES + 2):
        assert plans.lookup(signature, not_yet) is None
    assert len(made) == plans.TRIES and plans._plans.pop(signature) is None


def test_training_plans_know_the_gradients_shapes_and_strides(monkeypatch):
    """A backward plan carries dq's, dk's and dv's shapes and contiguous strides (the op allocates them with
    new_empty_strided), whichever backend built it; a forward plan none."""
    from types import SimpleNamespace

    from cusdpa.backends import plans
    from cusdpa.backends.flash import plans as flash_plans
    from cusdpa.dispatch import Backend

    built = plans.Plan(0, (2, 4, 8, 16), (512, 16, 64, 1), (2, 4, 8), (), (), "flash")
    monkeypatch.setattr(flash_plans, "build", lambda *args: built)
    pr = SimpleNamespace(q=np.empty((2, 4, 8, 16)), k=np.empty((2, 1, 5, 16)), v=np.empty((2, 1, 5, 32)))
    plan = plans.build(pr, Backend.FLASH, built.out_strides, backward=True)
    assert plan.grad_shapes == ((2, 4, 8, 16), (2, 1, 5, 16), (2, 1, 5, 32))
    assert plan.grad_strides == ((512, 128, 16, 1), (80, 80, 16, 1), (160, 160, 32, 1))
    assert plan.lse_strides == (32, 8, 1)
    assert plans.build(pr, Backend.FLASH, built.out_strides, backward=False) is built and built.grad_shapes == ()
    assert plans.build(pr, Backend.MATH, built.out_strides, backward=True) is None


def test_oversized_argument_is_refused():
    with pytest.raises(TypeError, match="does not fit"):
        launch._cell(np.zeros(3, np.float64))


class FakeMap:  # a TensorMap whose driver keeps the address at byte 16 of a 128-byte template
    template = bytes(range(128))
    offset = 16


class FreshMap(FakeMap):  # one whose driver does not: every call encodes (here: the address at byte 40)
    offset = None

    def write(self, dst, ptr):
        want = bytearray(self.template)
        want[40:48] = ptr.to_bytes(8, "little")
        ctypes.memmove(dst, bytes(want), 128)


@pytest.mark.parametrize("tensor_map", [FakeMap(), FreshMap()], ids=["address word", "encoded afresh"])
def test_map_slots_pass_each_calls_map_by_value(monkeypatch, tensor_map):
    """A MapSlot's parameter is 128 bytes of its own: the template with the call's address written in."""
    seen = {}

    class Driver:
        @staticmethod
        def launchKernel(fn, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
            pointers = (ctypes.c_void_p * 3).from_address(params)
            seen["map"] = ctypes.string_at(pointers[0], 128)
            seen["cells"] = [ctypes.c_uint64.from_address(pointers[i]).value for i in (1, 2)]

    monkeypatch.setattr(launch._Driver, "driver", Driver)
    fn = type("Fn", (), {"ptr": 1})()
    prepared = launch.Launch(fn, (1, 1), (128,), 0, (launch.MapSlot("q", tensor_map), launch.Slot("o"), np.int32(9)))
    assert prepared.maps == ((0, launch.SLOTS.index("q"), tensor_map),) and prepared.slots == ((1, 3),)
    at = 40 if tensor_map.offset is None else tensor_map.offset
    for q, o in ((0x1000, 0x2000), (0x7F00_0000_1230, 0x3000), (FakeCupyArray(), 0x4000)):
        prepared(launch.values(q=q, o=o), 0)
        want = bytearray(FakeMap.template)
        want[at:at + 8] = launch._cell(q).to_bytes(8, "little")
        assert seen["map"] == bytes(want) and seen["cells"] == [o, 9]


def test_tensor_maps_find_where_the_address_lives(monkeypatch):
    from cusdpa.backends.flash import tma

    calls = []

    def encode(dtype_name, ptr, dims, strides, box):  # a driver that keeps the address at byte 8
        calls.append((dims, strides, box))
        return bytes(8) + ptr.to_bytes(8, "little") + bytes([len(dims)]) * 112

    monkeypatch.setattr(tma, "encode", encode)
    monkeypatch.setattr(tma, "_DRIVER", {})
    m, hm, bm = tma.operand_map("bfloat16", 0x10000, 96, 300, 4, 2, (4 * 300 * 96, 0, 96), box_rows=128)
    assert m.offset == 8 and (hm, bm) == (0, 1)  # head stride 0: a broadcast head, addressed at coordinate 0
    dims, strides, box = calls[0]
    assert dims == (96, 300, 1, 2) and box == (32, 128, 1, 1)  # 96 columns: 64-byte swizzle, 32-column boxes
    assert strides[0] == 192 and strides[2] == 4 * 300 * 96 * 2 and all(x % 16 == 0 for x in strides)
    assert m.template == encode("bfloat16", 0x10000, *calls[0])
    before = len(calls)
    _, _, bm = tma.operand_map("float16", 0x10000, 64, 0, 2, 1, (0, 64 * 5, 64), box_rows=80)
    assert len(calls) == before + 1  # the driver was probed once, by the first map: one encode per map after
    assert bm == 0 and calls[-1][0] == (64, 1, 2, 1)  # no rows: still a valid map; one batch: coordinate 0
    # a driver that encodes the address some other way: every call encodes afresh
    monkeypatch.setattr(tma, "encode", lambda d, ptr, *a: (ptr * 3).to_bytes(16, "little") + bytes(112))
    monkeypatch.setattr(tma, "_DRIVER", {})
    m = tma.TensorMap("bfloat16", 0x10000, (64, 8, 1, 1), (128, 1024, 1024), (64, 8, 1, 1))
    assert m.offset is None
    buf = ctypes.create_string_buffer(m.template, 128)
    m.write(ctypes.addressof(buf), 0x30000)
    assert buf.raw[:16] == (0x30000 * 3).to_bytes(16, "little")


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


def _options(kw):
    from interop import arguments

    return arguments.options(kw.get("dropout_p", 0.0), kw.get("is_causal", False), kw.get("scale"),
                             kw.get("enable_gqa", False), kw.get("causal_variant", "upper_left"), kw.get("window"),
                             kw.get("softcap", 0.0))


def _general(monkeypatch, q, k, v, kw, dout):
    """out and (dq, dk, dv) with plans turned off: full validation, dispatch, CuPy views."""
    import torch

    import interop
    from cusdpa.backends import plans

    with monkeypatch.context() as patched:
        patched.setattr(plans, "lookup", lambda signature, make: None)
        out = interop.scaled_dot_product_attention(q, k, v, **kw)
        return out.detach(), torch.autograd.grad(out, (q, k, v), dout)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(CASES))
def test_replayed_plans_are_bit_identical_to_the_general_path(name, rng, monkeypatch):
    torch = _torch_cuda()
    import interop
    from cusdpa.backends import plans

    case = CASES[name]
    dtype = getattr(torch, case["dtype"])
    q, k, v = _inputs(torch, case["q"], case["kv"], dtype, int(rng.integers(2**31)))
    kw = case["kw"]
    plans._plans.clear()
    for _ in range(2):  # the first call builds the plan, the second replays it
        torch.manual_seed(5)
        fast = interop.scaled_dot_product_attention(q, k, v, **kw)
    dout = torch.randn_like(fast)
    got = torch.autograd.grad(fast, (q, k, v), dout)
    built = [p for p in plans._plans.values() if p is not None]
    assert sorted(bool(p.backward) for p in built) == [False, True], "one forward plan, one training plan"
    torch.manual_seed(5)  # the general path draws the same dropout seed
    slow, want = _general(monkeypatch, q, k, v, kw, dout)
    assert torch.equal(fast.detach(), slow) and fast.stride() == slow.stride()  # both token-major
    for g, w in zip(got, want):
        assert g.shape == w.shape and torch.equal(g, w)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["causal_bf16", "gqa_E128"])
def test_plans_store_o_with_tma(name, rng, monkeypatch):
    """FlashConfig.fwd90_tma_store through the torch bridge: the plan encodes O's tensor map with a stand-in
    address (the output is allocated per call) and each call writes its own into it. Made, then replayed
    twice into new outputs, the forward equals the register stores' bit for bit."""
    torch = _torch_cuda()
    import dataclasses

    import interop
    from cusdpa.backends import plans
    from cusdpa.backends.flash import launches

    case = CASES[name]
    q, k, v = _inputs(torch, case["q"], case["kv"], getattr(torch, case["dtype"]), int(rng.integers(2**31)))
    real = launches.config
    monkeypatch.setattr(launches, "config", lambda pr: dataclasses.replace(real(pr), fwd90_tma_store=False))
    plans._plans.clear()
    want = interop.scaled_dot_product_attention(q, k, v, **case["kw"]).detach()
    monkeypatch.setattr(launches, "config", lambda pr: dataclasses.replace(real(pr), fwd90_tma_store=True))
    plans._plans.clear()
    for _ in range(3):
        got = interop.scaled_dot_product_attention(q, k, v, **case["kw"]).detach()
        assert torch.equal(got, want)
    assert [p for p in plans._plans.values() if p is not None], "the calls made a plan"
    plans._plans.clear()


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["causal_bf16", "window_dropout"])
def test_the_ops_replay_plans_for_compiled_graphs(name, rng, monkeypatch):
    """The custom ops themselves (what a compiled graph calls) replay the plans; a backward op handed an out
    it cannot read in place takes the general path."""
    torch = _torch_cuda()
    from cusdpa.backends import plans
    from interop import ops

    case = CASES[name]
    q, k, v = _inputs(torch, case["q"], case["kv"], getattr(torch, case["dtype"]), int(rng.integers(2**31)))
    opts = _options(case["kw"])
    seed = torch.tensor([77]) if case["kw"].get("dropout_p") else None
    backends = "flash,efficient,math"
    plans._plans.clear()
    out, lse = ops.sdpa_fwd(q, k, v, None, None, *opts, seed, backends)
    dout = torch.randn_like(out)
    dq, dk, dv, _ = ops.sdpa_bwd(dout, q, k, v, None, None, out, lse, *opts, seed, backends, False, False)
    assert sorted(bool(p.backward) for p in plans._plans.values()) == [False, True]
    with monkeypatch.context() as patched:
        patched.setattr(plans, "lookup", lambda signature, make: None)
        slow, slow_lse = ops.sdpa_fwd(q, k, v, None, None, *opts, seed, backends)
        want = ops.sdpa_bwd(dout, q, k, v, None, None, slow, slow_lse, *opts, seed, backends, False, False)[:3]
    assert torch.equal(out, slow) and torch.equal(lse, slow_lse)
    for g, w in zip((dq, dk, dv), want):
        assert torch.equal(g, w)
    strided = torch.empty(*out.shape[:-1], 2 * out.shape[-1], dtype=out.dtype, device="cuda")[..., ::2]
    strided.copy_(out)
    again = ops.sdpa_bwd(dout, q, k, v, None, None, strided, lse, *opts, seed, backends, False, False)[:3]
    for g, w in zip(again, want):
        assert torch.equal(g, w)


EFFICIENT_CASES = {  # the tensor_core kernels with a bool mask and dropout, and in fp32; the portable ones past
    # fp32's tensor_core head dims
    "bf16_bool_mask_dropout": dict(q=(2, 4, 200, 64), kv=(2, 4, 200, 64), dtype="bfloat16",
                                   kw=dict(dropout_p=0.2), mask=True),
    "fp32_causal_gqa": dict(q=(1, 4, 130, 32), kv=(1, 2, 150, 32), dtype="float32",
                            kw=dict(is_causal=True, enable_gqa=True, causal_variant="lower_right"), mask=False),
    "fp32_wide_portable": dict(q=(1, 2, 70, 160), kv=(1, 2, 90, 160), dtype="float32", kw=dict(is_causal=True),
                               mask=False),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(EFFICIENT_CASES))
def test_efficient_plans_replay_the_general_paths_bits(name, rng, monkeypatch):
    """EFFICIENT's plans are recorded once the general path has launched each kernel (the first call), then
    replayed: forward and backward equal the general path bit for bit."""
    torch = _torch_cuda()
    import cusdpa
    import interop
    from cusdpa.backends import plans

    case = EFFICIENT_CASES[name]
    q, k, v = _inputs(torch, case["q"], case["kv"], getattr(torch, case["dtype"]), int(rng.integers(2**31)))
    kw = dict(case["kw"])
    if case["mask"]:
        kw["attn_mask"] = torch.rand(case["q"][-2], case["kv"][-2], device="cuda") > 0.3
    dout = torch.randn(*case["q"][:-1], case["kv"][-1], device="cuda", dtype=q.dtype)
    plans._plans.clear()
    with cusdpa.sdpa_kernel([cusdpa.Backend.EFFICIENT]):
        for _ in range(3):  # general path; plan recorded and replayed; replayed
            torch.manual_seed(5)
            fast = interop.scaled_dot_product_attention(q, k, v, **kw)
            got = torch.autograd.grad(fast, (q, k, v), dout)
        built = [p for p in plans._plans.values() if p is not None]
        assert sorted((p.backend, bool(p.backward)) for p in built) == [("efficient", False), ("efficient", True)]
        torch.manual_seed(5)
        slow, want = _general(monkeypatch, q, k, v, kw, dout)
    assert torch.equal(fast.detach(), slow) and fast.stride() == slow.stride()
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.gpu
def test_plans_on_a_side_stream_without_host_sync():
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
def test_plans_on_the_tensors_device(monkeypatch):
    """Plans replayed on cuda:1 while cuda:0 is current: outputs and gradients there, equal to the general path."""
    torch = _torch_cuda()
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    import interop
    from cusdpa.backends import plans

    with torch.cuda.device(1):
        q, k, v = _inputs(torch, (2, 4, 300, 64), (2, 4, 300, 64), torch.bfloat16, 7)
        dout = torch.randn(2, 4, 300, 64, device="cuda", dtype=torch.bfloat16)
    plans._plans.clear()
    with torch.cuda.device(0):
        for _ in range(2):  # the first call builds the plan, the second replays it
            fast = interop.scaled_dot_product_attention(q, k, v, is_causal=True)
        got = torch.autograd.grad(fast, (q, k, v), dout)
        assert torch.cuda.current_device() == 0
    assert any(p is not None and p.backward for p in plans._plans.values())
    with torch.cuda.device(1):
        slow, want = _general(monkeypatch, q, k, v, dict(is_causal=True), dout)
    assert fast.device == torch.device("cuda:1") and torch.equal(fast.detach(), slow)
    for g, w in zip(got, want):
        assert g.device == torch.device("cuda:1") and torch.equal(g, w)


@pytest.mark.gpu
def test_calls_plans_do_not_cover_take_the_general_path():
    """Misaligned inputs build no FLASH plan (and stay right); fp32, which EFFICIENT runs, gets EFFICIENT's
    plan from its second call. (Masked calls take plans: test_interop_gpu.py.)"""
    torch = _torch_cuda()
    import interop
    from cusdpa.backends import plans

    q, k, v = _inputs(torch, (2, 2, 64, 64), (2, 2, 64, 64), torch.float16, 4)
    plans._plans.clear()
    base = torch.empty(2 * 2 * 64 * 64 + 1, device="cuda", dtype=torch.float16)
    shifted = base[1:].view(2, 2, 64, 64)  # 2-byte offset: cp.async needs 16-byte rows
    shifted.copy_(q.detach())
    got = interop.scaled_dot_product_attention(shifted, k.detach(), v.detach())
    assert list(plans._plans.values()) == [None]
    want = interop.scaled_dot_product_attention(q.detach(), k.detach(), v.detach())
    assert torch.equal(got, want)
    plans._plans.clear()
    q32 = q.detach().float()
    for _ in range(2):  # the first call prepares EFFICIENT's kernels if no earlier one did
        interop.scaled_dot_product_attention(q32, q32, q32)
    assert [p.backend for p in plans._plans.values()] == ["efficient"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, backend", [("bfloat16", "FLASH"), ("float16", "EFFICIENT"), ("float32", "EFFICIENT")])
def test_cupy_vjp_replays_a_training_plan(dtype, backend, rng, monkeypatch):
    """cusdpa.attention_vjp on CuPy arrays: a repeated call replays the forward and backward launches of its
    signature's plan, giving the general path's bits, dropout and a dout of another layout included."""
    _torch_cuda()
    import cupy as cp

    import cusdpa
    from cusdpa.backends import plans
    from cusdpa.verify import harness

    q = cp.asarray(harness.draw(rng, (2, 4, 190, 64), dtype))
    k, v = (cp.asarray(harness.draw(rng, (2, 2, 210, 64), dtype)) for _ in range(2))
    dout = cp.asarray(harness.draw(rng, (2, 4, 64, 190), dtype)).transpose(0, 1, 3, 2)  # not C-contiguous
    kw = dict(is_causal=True, enable_gqa=True, dropout_p=0.15, seed=11)

    def bits(x):
        return x.view(cp.uint16) if x.itemsize == 2 else x

    def run():
        out, vjp = cusdpa.attention_vjp(q, k, v, deterministic=True, **kw)  # FLASH's dQ in a fixed order
        return (out, *vjp(dout))

    plans._plans.clear()
    with cusdpa.sdpa_kernel([getattr(cusdpa.Backend, backend)]):
        runs = [run() for _ in range(3)]  # EFFICIENT plans from the second call, FLASH's from the first
        assert any(p is not None and p.backward and p.backend == backend.lower() for p in plans._plans.values())
        monkeypatch.setattr(plans, "lookup", lambda signature, make: None)
        want = run()
    for got in runs:
        for g, w in zip(got, want):
            assert g.shape == w.shape and cp.array_equal(bits(g), bits(w))


# ---- the compiled replay (interop.native) ---------------------------------------------------------------------

def _native(monkeypatch, on: bool) -> list:
    """The compiled replay on or off; the list of whether each call took it since."""
    from interop import native

    if not native.load():
        pytest.fail(f"the compiled replay did not build: {native.reason()}")
    monkeypatch.setattr(native, "ENABLED", on)
    taken, real = [], native.attention

    def spy(*args):
        got = real(*args)
        taken.append(got is not None)
        return got

    monkeypatch.setattr(native, "attention", spy)
    return taken


def _run(torch, q, k, v, kw, dout, calls=2):
    import interop

    for _ in range(calls):  # the first call builds the plans (EFFICIENT's: the second), the last replays them
        torch.manual_seed(5)
        out = interop.scaled_dot_product_attention(q, k, v, **kw)
    return out.detach(), torch.autograd.grad(out, (q, k, v), dout)


NATIVE_CASES = dict(CASES, efficient_fp32_gqa=dict(q=(1, 4, 130, 32), kv=(1, 2, 150, 32), dtype="float32",
                                                   kw=dict(is_causal=True, enable_gqa=True)),
                    efficient_bf16_dropout=dict(q=(2, 2, 100, 64), kv=(2, 2, 120, 64), dtype="bfloat16",
                                                kw=dict(dropout_p=0.2), backend="EFFICIENT"),
                    # an attn_mask without gradient, read through the plan's mask slot (broadcast over heads)
                    efficient_bool_mask=dict(q=(2, 2, 70, 64), kv=(2, 2, 90, 64), dtype="float16", kw={},
                                             mask=(2, 1, 70, 90), backend="EFFICIENT"),
                    # ... and FLASH's, whose kernels read the mask's summary (native.MASK_SUMMARIES: buffers kept by
                    # interop.mask_summaries, asked for by the library)
                    flash_bool_mask_summary=dict(q=(2, 2, 130, 64), kv=(2, 2, 200, 64), dtype="bfloat16", kw={},
                                                 mask=(2, 1, 130, 200), summaries=True))


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(NATIVE_CASES))
def test_compiled_replay_gives_the_python_path_s_bits(name, rng, monkeypatch):
    """The plans replayed by the C++ op (forward, and the backward on autograd's thread) against the same plans
    replayed in Python: outputs, their strides and gradients bit for bit, dropout included."""
    torch = _torch_cuda()
    import cusdpa
    from cusdpa.backends import plans
    from interop import native

    case = NATIVE_CASES[name]
    q, k, v = _inputs(torch, case["q"], case["kv"], getattr(torch, case["dtype"]), int(rng.integers(2**31)))
    dout = torch.randn(*case["q"][:-1], case["kv"][-1], device="cuda", dtype=q.dtype)
    kw = dict(case["kw"])
    if "mask" in case:
        kw["attn_mask"] = torch.rand(case["mask"], device="cuda") > 0.3
    monkeypatch.setattr(native, "MASK_SUMMARIES", case.get("summaries", False))
    backends = [getattr(cusdpa.Backend, case["backend"])] if "backend" in case else list(cusdpa.Backend)
    plans._plans.clear()
    with cusdpa.sdpa_kernel(backends):
        _native(monkeypatch, False)
        slow, want = _run(torch, q, k, v, kw, dout, calls=3)
        taken = _native(monkeypatch, True)
        fast, got = _run(torch, q, k, v, kw, dout, calls=3)
    assert taken[-1], f"the last call did not take the compiled replay: {native.reason() or taken}"
    assert torch.equal(fast, slow) and fast.stride() == slow.stride()
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.stride() == w.stride() and torch.equal(g, w)


@pytest.mark.gpu
def test_compiled_replay_falls_back_when_deterministic_mode_turns(monkeypatch):
    """A backward whose deterministic mode turned on since the forward takes the general path's deterministic
    backward (the plan prepared a non-deterministic one); inference tensors and a side stream replay too."""
    torch = _torch_cuda()
    import interop

    q, k, v = _inputs(torch, (2, 4, 300, 64), (2, 4, 300, 64), torch.bfloat16, 3)
    dout = torch.randn(2, 4, 300, 64, device="cuda", dtype=torch.bfloat16)
    _native(monkeypatch, False)
    torch.use_deterministic_algorithms(True)
    try:
        out = interop.scaled_dot_product_attention(q, k, v, is_causal=True)
        want = torch.autograd.grad(out, (q, k, v), dout)
    finally:
        torch.use_deterministic_algorithms(False)
    taken = _native(monkeypatch, True)
    for _ in range(2):
        out = interop.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert taken == [True, True]
    torch.use_deterministic_algorithms(True)
    try:
        got = torch.autograd.grad(out, (q, k, v), dout)
    finally:
        torch.use_deterministic_algorithms(False)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    with torch.inference_mode():
        again = interop.scaled_dot_product_attention(q, k, v, is_causal=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        on_side = interop.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(again, out.detach()) and torch.equal(on_side, out.detach())


@pytest.mark.gpu
def test_a_compiled_function_calls_the_library_s_forward(rng, monkeypatch):
    """A compiled function's inference call (no mask, slopes, dropout or gradient) is the library's graph_forward
    in the graph: the general path's forward at its first call, which binds the signature's plan, the plan's
    replay after, with the Python path's bits and layout (native.GRAPH_FORWARD); off, the graph holds the ops'
    forward."""
    torch = _torch_cuda()
    import interop
    from interop import native

    q, k, v = (x.detach() for x in _inputs(torch, (2, 4, 300, 64), (2, 4, 300, 64), torch.bfloat16,
                                           int(rng.integers(2**31))))
    _native(monkeypatch, True)
    general, real = [], native._general_forward
    monkeypatch.setattr(native, "_general_forward", lambda *args: general.append(1) or real(*args))

    def attend(q, k, v):
        return interop.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.1)

    for graph_forward, first in ((True, [1]), (False, [])):
        monkeypatch.setattr(native, "GRAPH_FORWARD", graph_forward)
        torch._dynamo.reset()
        general.clear()
        compiled = torch.compile(attend, fullgraph=True)
        with torch.no_grad():
            outs = [compiled(q, k, v) for _ in range(3)]
        assert general == first  # the first call binds the plan, the others replay it
        monkeypatch.setattr(native, "ENABLED", False)
        with torch.no_grad():
            want = attend(q, k, v)
        monkeypatch.setattr(native, "ENABLED", True)
        assert all(torch.equal(o, want) and o.stride() == want.stride() for o in outs)


@pytest.mark.gpu
def test_the_forward_op_called_by_the_dispatcher_takes_the_compiled_replay(rng, monkeypatch):
    """native.COMPILED_OPS: torch.ops.cusdpa.sdpa_fwd called through the dispatcher, as compiled graphs call it
    (no mask, tensors that want no gradient), takes the compiled replay once its signature is bound, with the
    Python body's bits; with a mask it keeps the Python body."""
    torch = _torch_cuda()
    from interop import native

    q, k, v = (x.detach() for x in _inputs(torch, (2, 4, 300, 64), (2, 4, 300, 64), torch.bfloat16,
                                           int(rng.integers(2**31))))
    options = _options(dict(is_causal=True, window=(100, 0)))
    backends = "flash,efficient,math"

    def run(mask=None):
        return torch.ops.cusdpa.sdpa_fwd.default(q, k, v, mask, None, *options, None, backends)

    monkeypatch.setattr(native, "COMPILED_OPS", False)
    want = run()
    monkeypatch.setattr(native, "COMPILED_OPS", True)
    taken = _native(monkeypatch, True)
    for _ in range(3):
        got = run()
    assert taken and taken[-1], f"the op did not take the compiled replay: {native.reason() or taken}"
    assert all(torch.equal(g, w) and g.stride() == w.stride() for g, w in zip(got, want))
    calls = len(taken)
    run(torch.ones(300, 300, dtype=torch.bool, device="cuda"))
    assert len(taken) == calls  # a masked call: the Python body
