"""The compiled replay of plans (interop/native: replay.cpp) on the CPU: built with the system's compiler against
the installed torch, driven through a stand-in for the CUDA driver (tests/native/fake_driver.c) whose launches
call host functions on CPU tensors. What the GPU would run differs only in the driver; these tests check what the
replay hands it: the plan's encoding, outputs allocated as the plan says, every slot's address and the seed in
its cell, a TMA map's address word, memsets, the autograd Function (gradients, a gradient in another layout,
double backward refused, inference tensors, the fallback when torch's deterministic mode turns)."""
import ctypes
import shutil
import subprocess
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cusdpa.backends import plans  # noqa: E402
from cusdpa.backends.launch import Launch, MapSlot, Slot, ZeroWords  # noqa: E402
from interop import native  # noqa: E402

# The library opens its driver once per process: where CUDA is there, the GPU tests (test_plans.py,
# compiled_replay) drive the real one instead.
pytestmark = [pytest.mark.skipif(shutil.which("g++") is None or shutil.which("gcc") is None,
                                 reason="needs gcc and g++ to build the library and the stand-in driver"),
              pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests drive the real driver")]

SHAPE = (2, 3, 4, 5)  # (B, H, L, E): every tensor of the fake kernels
N, ROWS = int(np.prod(SHAPE)), int(np.prod(SHAPE[:-1]))


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    """The stand-in driver, loaded (the replay opens it by CUSDPA_LIBCUDA at its first launch), and the library
    built into a fresh cache."""
    base = tmp_path_factory.mktemp("native")
    so = base / "fake_driver.so"
    source = native.SOURCE.parent.parent.parent / "tests" / "native" / "fake_driver.c"
    subprocess.run(["gcc", "-O1", "-shared", "-fPIC", str(source), "-o", str(so)], check=True)
    mp = pytest.MonkeyPatch()
    mp.setenv("CUSDPA_LIBCUDA", str(so))
    mp.setenv("CUSDPA_CACHE_DIR", str(base / "cache"))
    if not native.load():
        pytest.fail(f"the library did not build: {native.reason()}")
    yield ctypes.CDLL(str(so))
    mp.undo()


def _fn(lib, name):
    return types.SimpleNamespace(ptr=ctypes.cast(getattr(lib, name), ctypes.c_void_p).value)


def _plans(lib):
    """A forward plan (out contiguous) and a training plan over the fake kernels."""
    q_map = types.SimpleNamespace(template=bytes(range(128)), offset=16)  # q's address at word 2
    forward = [Launch(_fn(lib, "fake_forward"), (7, 3), (96,), 1234,
                      [Slot("q"), Slot("k"), Slot("v"), Slot("o"), Slot("lse"), Slot("seed_lo"), Slot("seed_hi"),
                       np.int64(N), np.int64(ROWS), MapSlot("q", q_map)])]
    backward = [ZeroWords("dq_accum", 6),
                Launch(_fn(lib, "fake_backward"), (1, 1), (32,), 0,
                       [Slot("do"), Slot("dq"), Slot("dk"), Slot("dv"), Slot("delta"), Slot("dq_accum"), np.int64(N),
                        np.int64(ROWS)])]
    strides = plans.contiguous_strides(SHAPE)
    fwd = plans.Plan(0, SHAPE, strides, SHAPE[:-1], tuple(forward), (), "flash")
    bwd = plans.Plan(0, SHAPE, strides, SHAPE[:-1], tuple(forward), tuple(backward), "flash", copies_dout=True,
                     dq_accum_elements=6, grad_shapes=(SHAPE, SHAPE, SHAPE))
    return fwd, bwd


def _inputs():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(SHAPE, generator=g, requires_grad=True) for _ in range(3)]


def test_forward_and_backward_replay_the_plan(driver):
    fwd, bwd = _plans(driver)
    calls = []
    pid = native.add(fwd, bwd, deterministic=False, forced=False, fallback=lambda *a: calls.append(a))
    q, k, v = _inputs()
    seed = native._signed((7 << 32) | 5)
    before = ctypes.c_int.in_dll(driver, "launches").value
    out, lse = torch.ops.cusdpa_native.attention(q, k, v, None, pid, seed)
    assert ctypes.c_int.in_dll(driver, "launches").value == before + 1
    assert ctypes.c_int.in_dll(driver, "map_ok").value == 1
    assert (ctypes.c_uint * 2).in_dll(driver, "last_grid")[:] == [7, 3]
    assert ctypes.c_uint.in_dll(driver, "last_block").value == 96 and ctypes.c_uint.in_dll(driver, "last_smem").value == 1234
    torch.testing.assert_close(out, q + 3 * k + 2 * v)
    assert out.stride() == plans.contiguous_strides(SHAPE) and out.requires_grad
    assert lse.shape == SHAPE[:-1] and lse.dtype == torch.float32 and not lse.requires_grad
    want = torch.arange(ROWS, dtype=torch.float32).reshape(SHAPE[:-1]) + 5
    want.view(-1)[0] += 7
    torch.testing.assert_close(lse, want)
    grad = torch.randn(SHAPE)
    out.backward(grad)
    assert ctypes.c_size_t.in_dll(driver, "memset_words").value == 6
    torch.testing.assert_close(q.grad, grad)
    torch.testing.assert_close(k.grad, 3 * grad)
    torch.testing.assert_close(v.grad, 2 * grad)
    assert not calls


def test_a_gradient_in_another_layout_is_copied_into_out_s(driver):
    fwd, bwd = _plans(driver)
    pid = native.add(fwd, bwd, False, False, lambda *a: None)
    q, k, v = _inputs()
    out, _ = torch.ops.cusdpa_native.attention(q, k, v, None, pid, 0)
    out.sum().backward()  # an expanded gradient: stride 0 everywhere
    torch.testing.assert_close(k.grad, torch.full(SHAPE, 3.0))
    q2, k2, v2 = _inputs()
    out, _ = torch.ops.cusdpa_native.attention(q2, k2, v2, None, pid, 0)
    grad = torch.randn(tuple(reversed(SHAPE))).permute(3, 2, 1, 0)  # transposed memory
    out.backward(grad)
    torch.testing.assert_close(v2.grad, 2 * grad)


def test_double_backward_is_refused(driver):
    fwd, bwd = _plans(driver)
    pid = native.add(fwd, bwd, False, False, lambda *a: None)
    q, k, v = _inputs()
    out, _ = torch.ops.cusdpa_native.attention(q, k, v, None, pid, 0)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(out.sum(), q, create_graph=True)


def test_deterministic_mode_turned_since_the_forward_takes_the_fallback(driver):
    fwd, bwd = _plans(driver)
    calls = []

    def fallback(grad_out, q, k, v, mask, out, lse, seed):
        calls.append(seed)
        return -grad_out, -grad_out, -grad_out

    pid = native.add(fwd, bwd, deterministic=False, forced=False, fallback=fallback)
    q, k, v = _inputs()
    out, _ = torch.ops.cusdpa_native.attention(q, k, v, None, pid, 11)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out.sum().backward()
    finally:
        torch.use_deterministic_algorithms(was)
    assert calls == [11]
    torch.testing.assert_close(q.grad, -torch.ones(SHAPE))
    # a plan forced deterministic (FlashAttention's deterministic=True) serves whatever the mode
    pid = native.add(fwd, bwd, deterministic=True, forced=True, fallback=fallback)
    q, k, v = _inputs()
    out, _ = torch.ops.cusdpa_native.attention(q, k, v, None, pid, 12)
    out.sum().backward()
    assert calls == [11]
    torch.testing.assert_close(q.grad, torch.ones(SHAPE))


def test_inference_tensors_run_the_forward_alone(driver):
    fwd, _ = _plans(driver)
    pid = native.add(fwd, None, False, False, lambda *a: None)
    with torch.inference_mode():
        q, k, v = (t.detach().clone() for t in _inputs())
        out, lse = torch.ops.cusdpa_native.attention(q, k, v, None, pid, 0)
    torch.testing.assert_close(out, q + 3 * k + 2 * v)
    with torch.no_grad():
        out, _ = torch.ops.cusdpa_native.attention(*_inputs(), None, pid, 0)
    assert not out.requires_grad


def test_plans_it_cannot_take_are_refused(driver):
    fwd, bwd = _plans(driver)
    fresh = types.SimpleNamespace(template=bytes(128), offset=None)
    launch = Launch(_fn(driver, "fake_forward"), (1, 1), (32,), 0, [MapSlot("q", fresh)])
    with pytest.raises(native.Unencodable):
        native.encode(plans.Plan(0, SHAPE, plans.contiguous_strides(SHAPE), SHAPE[:-1], (launch,), (), "flash"),
                      None, False, False)
    with pytest.raises(RuntimeError, match="no plan"):
        torch.ops.cusdpa_native.attention(*_inputs(), None, 10**6, 0)
    with pytest.raises(RuntimeError, match="ends early"):
        torch.ops.cusdpa_native.add_plan(native.encode(fwd, bwd, False, False)[:-3])
    assert native._signed(2**64 - 1) == -1 and native._signed(2**63 - 1) == 2**63 - 1


def test_a_library_that_does_not_build_leaves_the_python_path(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_state", {"loaded": None, "reason": "not built yet"})
    monkeypatch.setenv("CUSDPA_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a compiler that fails
    assert native.load() is False
    assert "compiling replay.cpp failed" in native.reason()
    assert not list((tmp_path / "native").glob("*.so"))


def test_the_front_end_makes_a_plan_once_a_signature(driver, monkeypatch):
    """interop.native.attention: one plan a signature (gradient wanted or not apart), found by the library from
    the second call on, the dropout seed into its cells, and no compiled replay under the profiler (the Python
    path names its ranges)."""
    from interop import arguments

    fwd, bwd = _plans(driver)
    made = []

    def make(query, key, value, mask, options, backends, need_grad, forced):
        made.append((need_grad, forced))
        return native.add(fwd, bwd if need_grad else None, forced, forced, None)

    monkeypatch.setattr(native, "_make", make)
    q, k, v = _inputs()
    options = arguments.options(0.25, True, None, False, "upper_left", None, 0.0)
    seed = torch.tensor([(3 << 32) | 9], dtype=torch.int64)
    for _ in range(2):
        out, lse = native.attention(q, k, v, None, seed, "flash", options, False, True)
    with torch.no_grad():
        native.attention(q, k, v, None, seed, "flash", options, False, False)
    assert made == [(True, False), (False, False)]
    torch.testing.assert_close(out, q + 3 * k + 2 * v)
    assert lse.view(-1)[1].item() == 10 and lse.view(-1)[0].item() == 12  # seed_lo + row, + seed_hi at row 0
    with torch.autograd.profiler.profile():
        assert native.attention(q, k, v, None, seed, "flash", options, False, True) is None


def test_signatures_without_a_plan_take_the_python_path_without_asking_again(driver, monkeypatch):
    """A signature _make refuses is bound to none (the library answers for it from then on); one whose plan is
    not ready yet (EFFICIENT's first call) is asked again, plans.TRIES times in all."""
    from interop import arguments

    answers = [None, plans.NOT_YET]
    made = []

    def make(*args):
        made.append(answers[0])
        return answers[0]

    monkeypatch.setattr(native, "_make", make)
    q, k, v = _inputs()
    for causal, answer in ((False, None), (True, plans.NOT_YET)):
        answers[0] = answer
        made.clear()
        options = arguments.options(0.0, causal, 0.125, False, "upper_left", [3, 1], 0.0)
        for _ in range(plans.TRIES + 2):
            assert native.attention(q, k, v, None, None, "flash,math", options, False, True) is None
        assert len(made) == (1 if answer is None else plans.TRIES)


def test_an_attn_mask_travels_in_its_slot_and_the_signature(driver, monkeypatch):
    """An attn_mask without gradient: its address in the plan's mask slot (the forward's kernel reads it) and
    handed to the fallback backward; its layout part of the signature (a mask laid out otherwise, or no mask,
    makes a plan of its own)."""
    from interop import arguments

    _, bwd = _plans(driver)
    forward = (Launch(_fn(driver, "fake_masked_forward"), (1, 1), (32,), 0,
                      [Slot("q"), Slot("k"), Slot("v"), Slot("mask"), Slot("o"), np.int64(N)]),)
    masked = plans.Plan(0, SHAPE, plans.contiguous_strides(SHAPE), SHAPE[:-1], forward, bwd.backward, "efficient",
                        copies_dout=True, dq_accum_elements=6, grad_shapes=(SHAPE, SHAPE, SHAPE))
    made, given = [], []

    def fallback(grad_out, q, k, v, mask, out, lse, seed):
        given.append(mask)
        return grad_out, grad_out, grad_out

    def make(query, key, value, mask, options, backends, need_grad, forced):
        made.append(None if mask is None else mask.stride())
        return native.add(masked, masked, False, False, fallback)

    monkeypatch.setattr(native, "_make", make)
    q, k, v = _inputs()
    mask = torch.randn(SHAPE)
    options = arguments.options(0.0, False, None, False, "upper_left", None, 0.0)
    for _ in range(2):
        out, _ = native.attention(q, k, v, mask, None, "efficient", options, False, True)
    torch.testing.assert_close(out, q + 3 * k + 2 * v + mask)
    other = mask.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)  # the same values, transposed in memory
    out, _ = native.attention(q, k, v, other, None, "efficient", options, False, True)
    in_memory = mask.permute(3, 2, 1, 0).reshape(SHAPE)  # (the stand-in kernel reads a mask's memory in order)
    torch.testing.assert_close(out, q + 3 * k + 2 * v + in_memory)
    assert made == [mask.stride(), other.stride()]
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # a backward the plan did not prepare: the fallback, given the mask
    try:
        out.sum().backward()
    finally:
        torch.use_deterministic_algorithms(was)
    assert len(given) == 1 and given[0].data_ptr() == other.data_ptr()


def test_a_mask_summary_comes_from_python_once_a_forward(driver, monkeypatch):
    """A plan whose kernels read an attn_mask's summary (FLASH's, with native.MASK_SUMMARIES): the library asks
    Python's ``summary`` op for its (seen, blocks) buffers once a forward, on the launches' stream, hands their
    addresses to the forward's kernels and the same buffers to the backward's; without MASK_SUMMARIES such a plan
    is refused."""
    strides = plans.contiguous_strides(SHAPE)
    forward = (Launch(_fn(driver, "fake_summarised_forward"), (1, 1), (32,), 0,
                      [Slot("q"), Slot("k"), Slot("v"), Slot("mask"), Slot("seen"), Slot("blocks"), Slot("o"),
                       np.int64(N)]),)
    backward = (Launch(_fn(driver, "fake_summarised_backward"), (1, 1), (32,), 0,
                       [Slot("do"), Slot("seen"), Slot("blocks"), Slot("dq"), Slot("dk"), Slot("dv"), np.int64(N)]),)
    plan = plans.Plan(0, SHAPE, strides, SHAPE[:-1], forward, backward, "flash", copies_dout=True,
                      grad_shapes=(SHAPE, SHAPE, SHAPE), summary=("its launches",), summary_key="tiles")
    monkeypatch.setattr(native, "MASK_SUMMARIES", False)
    with pytest.raises(native.Unencodable):
        native.encode(plan, plan, False, False)
    monkeypatch.setattr(native, "MASK_SUMMARIES", True)
    asked = []

    def summary(query, mask, pid, stream):
        asked.append((pid, stream, mask.data_ptr()))
        return torch.full(SHAPE, 2.0), torch.full(SHAPE, 3.0)

    monkeypatch.setattr(native, "_summary", summary)
    pid = native.add(plan, plan, False, False, None)
    q, k, v = _inputs()
    mask = torch.randn(SHAPE)
    out, _ = torch.ops.cusdpa_native.attention(q, k, v, mask, pid, 0)
    torch.testing.assert_close(out, q + 3 * k + 2 * v + mask + 5)
    grad = torch.randn(SHAPE)
    out.backward(grad)
    assert asked == [(pid, 0, mask.data_ptr())]  # the backward read the forward's buffers
    torch.testing.assert_close(q.grad, 2 * grad)
    torch.testing.assert_close(k.grad, 3 * grad)
    torch.testing.assert_close(v.grad, grad)
    with pytest.raises(RuntimeError, match="no mask given"):
        torch.ops.cusdpa_native.attention(q, k, v, None, pid, 0)


def test_a_compiled_graph_s_forward_replays_the_bound_plan(driver, monkeypatch):
    """graph_forward, the forward compiled graphs call (interop.autograd puts it there where Dynamo traces a call
    without mask, slopes, dropout or gradient): the general path's forward (interop.native's general_forward) until
    a plan is bound to the call's signature, that plan's replay after; Dynamo traces it and graph_kind into one
    graph; graph_kind answers -1 (trace the ops' forward) with GRAPH_FORWARD off."""
    from interop import arguments

    fwd, _ = _plans(driver)
    q, k, v = (x.detach() for x in _inputs())
    options = arguments.options(0.0, True, None, False, "upper_left", None, 0.0)
    general = []

    def general_forward(query, key, value, kind):
        general.append(kind)
        return query + 1, query.sum(-1)

    monkeypatch.setattr(native, "_general_forward", general_forward)
    monkeypatch.setattr(native, "GRAPH_FORWARD", True)
    kind = native.graph_kind(options, "flash")
    assert kind >= 0 and native._graph_kinds[kind] == (options, "flash")
    out, _ = torch.ops.cusdpa_native.graph_forward(q, k, v, kind)
    assert general == [kind]
    torch.testing.assert_close(out, q + 1)
    torch.ops.cusdpa_native.bind(kind, q, k, v, None, native.add(fwd, None, False, False, None))
    out, lse = torch.ops.cusdpa_native.graph_forward(q, k, v, kind)
    assert general == [kind]
    torch.testing.assert_close(out, q + 3 * k + 2 * v)

    def traced(query, key, value):
        return torch.ops.cusdpa_native.graph_forward(query, key, value, native.graph_kind(options, "flash"))[0] * 2

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(traced, backend="eager", fullgraph=True)(q, k, v), 2 * (q + 3 * k + 2 * v))
    assert general == [kind]
    monkeypatch.setattr(native, "GRAPH_FORWARD", False)
    assert native.graph_kind(options, "flash") == -1
