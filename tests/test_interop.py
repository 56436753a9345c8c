"""PyTorch bridge on CPU tensors (the reference backend): values and gradients against PyTorch's SDPA,
custom-op checks, torch.compile, dropout seeding, the SDPA override, nested tensors, the profiler."""
import dataclasses
import importlib.util
import pathlib
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import cusdpa  # noqa: E402
import interop  # noqa: E402
from cusdpa import Backend, dispatch, reference
from cusdpa.verify import harness  # noqa: E402
from interop import arguments, ops, override  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def randn(rng, *shape, dtype=torch.float32, grad=True):
    return torch.tensor(rng.standard_normal(shape), dtype=dtype).requires_grad_(grad)


@dataclasses.dataclass
class Case:
    q: tuple = (2, 3, 9, 8)
    kv: tuple = (2, 3, 13, 8)
    ev: int = 8
    mask: str | None = None  # None, "bool" or "float"
    mask_shape: tuple = (9, 13)
    kwargs: dict = dataclasses.field(default_factory=dict)


CASES = {
    "plain": Case(),
    "causal": Case(kwargs=dict(is_causal=True)),
    "causal_square_odd": Case(q=(1, 2, 37, 40), kv=(1, 2, 37, 40), ev=40, kwargs=dict(is_causal=True)),
    "bool_mask": Case(mask="bool", mask_shape=(2, 1, 9, 13)),
    "float_mask": Case(mask="float", mask_shape=(3, 9, 13)),
    "gqa": Case(q=(2, 6, 9, 8), kv=(2, 2, 13, 8), kwargs=dict(enable_gqa=True, is_causal=True)),
    "scale_and_ev": Case(ev=5, kwargs=dict(scale=0.3)),
    "rank3_broadcast_kv": Case(q=(3, 9, 8), kv=(3, 13, 8), mask="float", mask_shape=(13,)),
}


def make_case(rng, case: Case, dtype=torch.float32):
    q = randn(rng, *case.q, dtype=dtype)
    k = randn(rng, *case.kv, dtype=dtype)
    v = randn(rng, *case.kv[:-1], case.ev, dtype=dtype)
    mask = None
    if case.mask == "bool":
        allowed = rng.random(case.mask_shape) < 0.7
        allowed[..., 0] = True  # PyTorch returns NaN for a row with no visible key; cusdpa returns 0
        mask = torch.tensor(allowed)
    elif case.mask == "float":
        mask = randn(rng, *case.mask_shape, dtype=dtype)
    return q, k, v, mask


def grads_of(out, inputs, dout):
    wanted = [x for x in inputs if x is not None and x.requires_grad]
    return torch.autograd.grad(out, wanted, dout)


@pytest.mark.parametrize("name", CASES)
def test_values_and_gradients_match_pytorch(rng, name):
    """Output (dtype, shape, values) and gradients judged by the harness: the float64 reference, PyTorch's
    error at the same precision."""
    q, k, v, mask = make_case(rng, CASES[name])
    failures = harness.run_torch(interop.scaled_dot_product_attention, q, k, v, mask, rng=rng, **CASES[name].kwargs)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_keeps_dtype_and_matches_pytorch(rng, dtype):
    q, k, v, mask = make_case(rng, CASES["float_mask"], dtype=dtype)
    failures = harness.run_torch(interop.scaled_dot_product_attention, q, k, v, mask, rng=rng)
    assert not failures, "\n".join(failures)
    out = interop.scaled_dot_product_attention(q, k, v, mask)
    assert out.dtype == dtype
    grads = grads_of(out, (q, k, v, mask), torch.ones_like(out))
    assert [g.dtype for g in grads] == [dtype] * 4


def test_a_float_mask_without_grad_is_not_differentiated(rng, monkeypatch):
    """A float mask that requires no gradient: the backward asks for none (the backends that cannot give one,
    FLASH's, may run it) and the inputs' gradients are PyTorch's; one that requires it gets dmask."""
    wanted = []
    real = ops._backward
    monkeypatch.setattr(ops, "_backward", lambda *a: wanted.append(a[-1]) or real(*a))
    q, k, v, mask = make_case(rng, CASES["float_mask"], dtype=torch.float64)
    for needs in (False, True):
        m = mask.detach().requires_grad_(needs)
        dout = torch.randn(q.shape[:-1] + v.shape[-1:], dtype=torch.float64)
        ours = grads_of(interop.scaled_dot_product_attention(q, k, v, m), (q, k, v, m), dout)
        theirs = grads_of(F.scaled_dot_product_attention(q, k, v, m), (q, k, v, m), dout)
        assert len(ours) == len(theirs) == 3 + needs
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b)
    assert wanted == [False, True]


def test_double_backward_is_refused_not_silently_zero(rng):
    """The ops have no derivative of their own: create_graph=True must raise rather than give a zero
    second-order gradient."""
    q = randn(rng, 1, 2, 5, 8, dtype=torch.float64)
    out = interop.scaled_dot_product_attention(q, q, q)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(out.sum(), q, create_graph=True)
    packed = randn(rng, 7, 2, 8, dtype=torch.float64)
    jagged = torch.nested.nested_tensor_from_jagged(packed, torch.tensor([0, 3, 7])).transpose(1, 2)
    out = interop.scaled_dot_product_attention(jagged, jagged, jagged)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(out.values().sum(), packed, create_graph=True)


def test_extras_lower_right_window_and_empty_rows_follow_the_reference(rng):
    q, k, v = randn(rng, 2, 4, 7, 8, dtype=torch.float64), randn(rng, 2, 2, 11, 8, dtype=torch.float64), \
        randn(rng, 2, 2, 11, 6, dtype=torch.float64)
    mask = torch.tensor(rng.random((7, 11)) < 0.5)
    mask[3] = False  # a query row that sees nothing: output 0 and zero gradients, never NaN
    kw = dict(is_causal=True, enable_gqa=True, causal_variant="lower_right", window=(3, -1))
    out = interop.scaled_dot_product_attention(q, k, v, mask, **kw)
    arrays = [x.detach().numpy() for x in (q, k, v)]
    np.testing.assert_allclose(out.detach().numpy(), reference.attention(*arrays, mask.numpy(), **kw)[0], rtol=1e-12)
    assert torch.all(out[:, :, 3] == 0)
    dout = randn(rng, *out.shape, dtype=torch.float64, grad=False)
    want = reference.attention_grads(*arrays, dout.numpy(), mask.numpy(), **kw)
    for got, w in zip(torch.autograd.grad(out, (q, k, v), dout), want):
        np.testing.assert_allclose(got.numpy(), w, rtol=1e-10, atol=1e-12)


def test_dropout_is_seeded_by_torch_and_the_backward_replays_the_mask(rng):
    q, k, v, _ = make_case(rng, CASES["gqa"], dtype=torch.float64)

    def run(seed):
        torch.manual_seed(seed)
        return interop.scaled_dot_product_attention(q, k, v, dropout_p=0.4, enable_gqa=True, is_causal=True)

    out = run(7)
    assert torch.equal(out, run(7)) and not torch.equal(out, run(8))
    torch.manual_seed(7)
    seed = int(arguments.draw_seed(0.4))  # the seed the call above drew
    arrays = [x.detach().numpy() for x in (q, k, v)]
    kw = dict(dropout_p=0.4, enable_gqa=True, is_causal=True, seed=seed)
    np.testing.assert_allclose(out.detach().numpy(), reference.attention(*arrays, **kw)[0], rtol=1e-12)
    dout = randn(rng, *out.shape, dtype=torch.float64, grad=False)
    want = reference.attention_grads(*arrays, dout.numpy(), **kw)
    for got, w in zip(torch.autograd.grad(out, (q, k, v), dout), want):
        np.testing.assert_allclose(got.numpy(), w, rtol=1e-10, atol=1e-12)
    # Without dropout nothing is drawn: the caller's random stream is left as it was.
    torch.manual_seed(3)
    interop.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    after = torch.rand(1)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(1))


def test_opcheck_passes_for_every_op(rng):
    """The ops (schema, fake tensors, AOT dispatch); they carry no autograd formula (interop.autograd's
    Function differentiates them), so their inputs here need no gradient."""
    q, k, v, mask = (x.detach() for x in make_case(rng, CASES["float_mask"]))
    seed = torch.tensor([11])
    torch.library.opcheck(ops.sdpa_fwd, (q, k, v, mask, None, 0.2, True, None, False, "upper_left", None, 0.0,
                                         False, seed, "math"))
    qg, kg, vg = (x.detach() for x in make_case(rng, CASES["gqa"])[:3])
    slopes = torch.rand(qg.shape[-3])  # ALiBi, per query head
    torch.library.opcheck(ops.sdpa_fwd, (qg, kg, vg, None, slopes, 0.0, True, 0.5, True, "lower_right", [4, 0], 2.5,
                                         True, None, "math"))
    out, lse = ops.sdpa_fwd(q, k, v, mask, None, 0.0, False, None, False, "upper_left", None, 0.0, False, None,
                            "math")
    for mask_grad in (True, False):  # a float mask's gradient wanted, or dmask of no elements
        torch.library.opcheck(ops.sdpa_bwd, (torch.randn_like(out), q, k, v, mask, None, out, lse, 0.2, False, None,
                                             False, "upper_left", None, 0.0, False, seed, "math", False, mask_grad))
    cu = torch.tensor([0, 3, 3, 10], dtype=torch.int32)
    qv, kv, vv = (randn(rng, 10, 2, 8, grad=False) for _ in range(3))
    torch.library.opcheck(ops.varlen_fwd, (qv, kv, vv, cu, cu, torch.rand(3, 2), 7, 7, 0.3, True, None, False,
                                           "upper_left", None, 0.0, False, seed, "math"))


def test_plan_signatures_are_hashable_and_tell_every_option_apart():
    q = torch.zeros(1, 2, 8, 16)
    signatures = {ops._signature(q, q, q, None, arguments.options(0.0, True, None, False, "upper_left", window, cap,
                                                                  tf32), "math")
                  for window in (None, [4, 0], (4, 0)) for cap in (0.0, 2.0) for tf32 in (False, True)}
    assert len(signatures) == 8  # a list window and a tuple window are one signature
    # a mask's layout is part of it (its contents are not: each call's mask is summarised afresh)
    options = arguments.options(0.0, False, None, False, "upper_left", None, 0.0)
    keep = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    masks = (keep, ~keep, keep.expand(1, 2, 8, 8), keep.float(), torch.ones(1, 1, 8, 9, dtype=torch.bool)[..., 1:])
    masked = [ops._signature(q, q, q, m, options, "math") for m in masks]
    assert masked[0] == masked[1] and len(set(masked[1:])) == 4 and hash(masked[0])


def test_tf32_follows_torchs_switch_for_fp32_cuda_inputs_only():
    """Options.allow_tf32 from torch.backends.cuda.matmul.fp32_precision (set by the new API or the legacy
    allow_tf32 / set_float32_matmul_precision), for fp32 CUDA tensors; CPU and 16-bit inputs never take it."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        for precision in ("tf32", "ieee"):
            matmul.fp32_precision = precision
            assert arguments.tf32_matmuls() is (precision == "tf32")
            assert not arguments.tf32_allowed(torch.zeros(2, dtype=torch.float32))  # a CPU tensor
        assert not arguments.tf32_allowed(None)
    finally:
        matmul.fp32_precision = before
    with pytest.raises(cusdpa.ArgumentTypeError, match="allow_tf32"):
        arguments.options(0.0, False, None, False, "upper_left", None, 0.0, "yes")
    assert arguments.resolve(0.0, False, None, False, "upper_left", None, 0.0, None, True)[0][-1] is True


class TinyBlock(nn.Module):
    def __init__(self, attention="cusdpa", dropout=0.0):
        super().__init__()
        self.ln = nn.LayerNorm(16)
        self.attn = interop.CausalSelfAttention(2, 16, bias=True, is_causal=True, dropout=dropout, attention=attention)

    def forward(self, x):
        return x + self.attn(self.ln(x))


def compile_capturing(fn):
    """torch.compile(fullgraph=True) on aot_eager (CPU inductor is too slow for CI), keeping the graphs."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    return torch.compile(fn, fullgraph=True, backend=backend), graphs


def calls_cusdpa(graphs, op="sdpa_fwd"):
    """Whether a captured graph calls the op (inside the autograd.Function's subgraphs, where Dynamo puts it)."""
    target = getattr(torch.ops.cusdpa, op).default
    return any(n.target in (target, getattr(torch.ops.cusdpa, op)) for gm in graphs for sub in gm.modules()
               if isinstance(sub, torch.fx.GraphModule) for n in sub.graph.nodes)


def test_compile_fullgraph_matches_eager_values_and_gradients(rng):
    torch.manual_seed(0)
    model = TinyBlock()
    x = randn(rng, 3, 11, 16)
    compiled, graphs = compile_capturing(model)
    got = compiled(x)
    got_grads = torch.autograd.grad(got.sum(), [x, *model.parameters()])
    assert calls_cusdpa(graphs)
    want = model(x)
    want_grads = torch.autograd.grad(want.sum(), [x, *model.parameters()])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


def test_compiled_graphs_are_told_from_exported_programs():
    """interop.autograd traces the library's graph_forward into compiled graphs, never into exported programs (its
    kind means something only to the process that traced it): its test of export is False under torch.compile and
    True under torch.export with every torch it runs on. (torch 2.11's Dynamo folds torch.compiler.is_exporting()
    to True in every trace, which kept graph_forward out of every compiled graph there.)"""
    from interop import autograd

    def f(x):
        return x + 1 if autograd._exporting() else x - 1

    class Module(torch.nn.Module):
        def forward(self, x):
            return f(x)

    x = torch.zeros(3)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, backend="eager", fullgraph=True)(x), x - 1)
    assert torch.equal(torch.export.export(Module(), (x,)).module()(x), x + 1)
    assert not autograd._exporting()


def test_compile_float_mask_gradient_and_dropout(rng):
    q, k, v, mask = make_case(rng, CASES["float_mask"])

    def f(q, k, v, mask):
        return interop.scaled_dot_product_attention(q, k, v, mask, dropout_p=0.3, is_causal=True)

    compiled, graphs = compile_capturing(f)
    torch.manual_seed(5)
    got = compiled(q, k, v, mask)
    got_grads = torch.autograd.grad(got.sum(), (q, k, v, mask))
    torch.manual_seed(5)
    want = f(q, k, v, mask)  # aot_eager draws the seed exactly as eager mode does
    want_grads = torch.autograd.grad(want.sum(), (q, k, v, mask))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    torch.manual_seed(6)
    assert not torch.equal(compiled(q, k, v, mask), got)  # a fresh seed per call, not one baked in


@pytest.fixture
def cusdpa_calls(monkeypatch):
    """Counts calls of the dense and varlen forward ops (eager mode)."""
    calls = {"sdpa_fwd": 0, "varlen_fwd": 0}
    for name in calls:
        real = getattr(ops, name)

        def spy(*args, _real=real, _name=name):
            calls[_name] += 1
            return _real(*args)

        monkeypatch.setattr(ops, name, spy)
    return calls


def same_module_outputs(rng, make, inputs, calls, key="sdpa_fwd"):
    """Run ``make()`` twice from one seed, with and without the override: same values and gradients,
    and cusdpa ran only under the override."""
    torch.manual_seed(0)
    want_mod = make()
    torch.manual_seed(0)
    got_mod = make()
    want = want_mod(*inputs)
    assert calls[key] == 0
    with interop.sdpa_override():
        got = got_mod(*inputs)
    assert calls[key] > 0
    got, want = (x[0] if isinstance(x, tuple) else x for x in (got, want))
    torch.testing.assert_close(got, want)
    got_grads = torch.autograd.grad(got.sum(), list(got_mod.parameters()))
    want_grads = torch.autograd.grad(want.sum(), list(want_mod.parameters()))
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


def test_override_reaches_transformer_encoder_layer_in_training(rng, cusdpa_calls):
    x = randn(rng, 3, 10, 16, grad=False)
    causal = nn.Transformer.generate_square_subsequent_mask(10)
    padding = torch.zeros(3, 10)
    padding[1, 7:] = float("-inf")

    def make():
        return nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True).train()

    same_module_outputs(rng, make, (x, causal, padding), cusdpa_calls)


def test_override_reaches_multihead_attention(rng, cusdpa_calls):
    x, mem = randn(rng, 2, 9, 16, grad=False), randn(rng, 2, 12, 16, grad=False)
    padding = torch.zeros(2, 12, dtype=torch.bool)
    padding[0, 10:] = True

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(16, 4, batch_first=True, kdim=8, vdim=8)

        def forward(self, x, mem):
            return self.mha(x, mem[..., :8], mem[..., 8:], key_padding_mask=padding, need_weights=False)[0]

    same_module_outputs(rng, Cross, (x, mem), cusdpa_calls)


def test_override_reaches_the_tutorial_module(rng, cusdpa_calls):
    x = randn(rng, 2, 9, 16, grad=False)
    same_module_outputs(rng, lambda: TinyBlock(attention="torch"), (x,), cusdpa_calls)


def test_override_falls_back_with_one_warning_per_reason(rng, cusdpa_calls, monkeypatch):
    monkeypatch.setattr(override, "_warned", set())
    q, k, v = (randn(rng, 2, 5, 8, grad=False) for _ in range(3))
    with interop.sdpa_override():
        with pytest.warns(UserWarning, match=r"scale=-0.5 .*falling back to PyTorch"):
            got = F.scaled_dot_product_attention(q, k, v, scale=-0.5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            F.scaled_dot_product_attention(q, k, v, scale=-0.5)  # the same reason warns once
        with pytest.warns(UserWarning, match="no cusdpa backend can run"):
            with cusdpa.sdpa_kernel(Backend.FLASH):
                F.scaled_dot_product_attention(q, k, v)
    assert cusdpa_calls["sdpa_fwd"] == 1  # only the attempt that dispatch refused
    torch.testing.assert_close(got, override._ORIGINAL(q, k, v, scale=-0.5))


def test_override_enable_disable_and_nesting(rng):
    original = F.scaled_dot_product_attention
    interop.enable_sdpa_override()
    try:
        assert F.scaled_dot_product_attention is not original
        with interop.sdpa_override(backend=Backend.MATH):
            assert override._state["backend"] is Backend.MATH
        assert override.override_enabled() and override._state["backend"] is None
    finally:
        interop.disable_sdpa_override()
    assert F.scaled_dot_product_attention is original
    with pytest.raises(TypeError, match="cusdpa.Backend"):
        interop.enable_sdpa_override(backend="flash")
    assert F.scaled_dot_product_attention is original


def test_override_compiles_without_graph_break(rng):
    x = randn(rng, 2, 9, 16, grad=False)
    torch.manual_seed(0)
    model = TinyBlock(attention="torch")
    with interop.sdpa_override():
        compiled, graphs = compile_capturing(model)
        got = compiled(x)
    assert calls_cusdpa(graphs)
    torch.testing.assert_close(got, model(x))


def nested_batch(rng, lengths, dim, grad=True):
    return torch.nested.nested_tensor([torch.tensor(rng.standard_normal((n, dim)), dtype=torch.float32)
                                       for n in lengths], layout=torch.jagged, requires_grad=grad)


@pytest.mark.parametrize("route", ["cusdpa", "override"])
def test_nested_jagged_batch_matches_per_sequence_attention(rng, route, cusdpa_calls):
    lengths = [5, 1, 9, 3]
    x = nested_batch(rng, lengths, 16)
    torch.manual_seed(0)
    model = TinyBlock(attention="torch" if route == "override" else "cusdpa")
    if route == "override":  # PyTorch's own jagged SDPA has no CPU kernel for these strided views
        with interop.sdpa_override():
            y = model(x)
    else:
        y = model(x)
    assert cusdpa_calls["varlen_fwd"] == 1 and y.is_nested
    y.values().square().sum().backward()
    nested_grads = [x.grad.values().clone(), *(p.grad.clone() for p in model.parameters())]
    model.zero_grad()
    dense = [t.detach().requires_grad_() for t in x.unbind()]
    ys = [model(t[None])[0] for t in dense]  # one sequence at a time with cusdpa's dense path
    sum(t.square().sum() for t in ys).backward()
    torch.testing.assert_close(y.values(), torch.cat(ys))
    torch.testing.assert_close(nested_grads[0], torch.cat([t.grad for t in dense]))
    for g, p in zip(nested_grads[1:], model.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_nested_dropout_and_gqa_follow_the_varlen_reference(rng):
    offsets = torch.tensor([0, 4, 11, 13])
    packed = [randn(rng, 13, 4, 8), randn(rng, 13, 2, 8), randn(rng, 13, 2, 8)]  # (tokens, H, E) leaves
    q, k, v = (torch.nested.nested_tensor_from_jagged(t, offsets).transpose(1, 2) for t in packed)
    torch.manual_seed(4)
    out = interop.scaled_dot_product_attention(q, k, v, dropout_p=0.25, is_causal=True, enable_gqa=True)
    torch.manual_seed(4)
    seed = int(arguments.draw_seed(0.25))
    cu = offsets.numpy().astype(np.int32)
    want, vjp = cusdpa.varlen_attention_vjp(*(t.detach().numpy() for t in packed), cu, cu, 7, 7, dropout_p=0.25,
                                            is_causal=True, enable_gqa=True, seed=seed)
    got = out.transpose(1, 2).values()
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-6, atol=1e-6)
    dout = rng.standard_normal(want.shape).astype(np.float32)
    for g, w in zip(torch.autograd.grad(got, packed, torch.from_numpy(dout)), vjp(dout)):
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-5, atol=1e-6)


def test_nested_errors_name_the_fix(rng):
    x = nested_batch(rng, [3, 4], 8, grad=False).unflatten(-1, (2, 4)).transpose(1, 2)
    dense = randn(rng, 2, 2, 4, 4, grad=False)
    with pytest.raises(ValueError, match="attn_mask is not supported with nested"):
        interop.scaled_dot_product_attention(x, x, x, attn_mask=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="must all be jagged nested tensors"):
        interop.scaled_dot_product_attention(x, dense, dense)


def test_profiler_shows_the_ops_and_the_backend(rng):
    q, k, v, mask = make_case(rng, CASES["float_mask"])
    with torch.profiler.profile() as prof:
        interop.scaled_dot_product_attention(q, k, v, mask).sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert {"cusdpa::sdpa_fwd", "cusdpa::sdpa_bwd", "cusdpa::math_fwd", "cusdpa::math_bwd"} <= names


def test_inputs_cross_without_copies_and_outputs_are_torch_allocated(rng, monkeypatch):
    seen = {}
    real = dispatch.implementation

    def spying(backend):
        impl = real(backend)

        def forward(pr, out=None, lse=None):
            seen.update(q=pr.q.ctypes.data, k=pr.k.ctypes.data, out=out.ctypes.data, lse=lse.ctypes.data)
            return impl.forward(pr, out, lse)

        return dataclasses.replace(impl, forward=forward)

    monkeypatch.setattr(dispatch, "implementation", spying)
    qkv = randn(rng, 2, 9, 3, 4, 8, grad=False)  # (B, L, 3, H, E): q, k, v are strided views of it
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    out = interop.scaled_dot_product_attention(q, k, v)
    assert (seen["q"], seen["k"], seen["out"]) == (q.data_ptr(), k.data_ptr(), out.data_ptr())
    strided = randn(rng, 2, 4, 9, 16, grad=False)[..., ::2]  # last-dim stride 2: the fused kernels need 1
    interop.scaled_dot_product_attention(strided, k, v)
    assert seen["q"] != strided.data_ptr()


@pytest.mark.parametrize("shape, strides", [
    ((5, 7), (7, 1)),  # rank 2: one head, row-major
    ((3, 4, 5), (5, 15, 1)),
    ((2, 3, 4, 5), (60, 5, 15, 1)),
    ((6, 2, 3, 4, 5), (120, 60, 5, 15, 1)),
])
def test_token_major_strides(shape, strides):
    from cusdpa.backends import plans

    assert plans.token_major_strides(shape) == strides
    if len(shape) >= 3:  # what torch gives a (..., L, H, Ev) buffer viewed as (..., H, L, Ev)
        assert torch.empty(shape).transpose(-3, -2).contiguous().transpose(-3, -2).stride() == strides


def test_output_is_token_major_so_merging_heads_is_a_view(rng):
    """As with PyTorch's fused kernels, out (B, H, L, Ev) lies (B, L, H, Ev) in memory: a module's
    transpose(1, 2).reshape(B, L, H * Ev) costs no copy, eager or compiled, and the gradient flowing
    back through it arrives in the same layout."""
    q, k, v = (randn(rng, 2, 3, 9, 8) for _ in range(3))

    def merged(q, k, v):
        return interop.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 9, 24)

    out = interop.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.stride() == (216, 8, 24, 1)
    view = out.transpose(1, 2).reshape(2, 9, 24)
    assert view.data_ptr() == out.data_ptr() and view.is_contiguous()
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 9, 24)
    got, compiled = merged(q, k, v), torch.compile(merged, fullgraph=True)(q, k, v)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(compiled, got, rtol=0, atol=0)
    dout = randn(rng, 2, 9, 24, grad=False)
    for g, w in zip(torch.autograd.grad(got, (q, k, v), dout), torch.autograd.grad(want, (q, k, v), dout)):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("backend", [Backend.MATH, [Backend.MATH, Backend.FLASH]])
def test_backend_argument_restricts_dispatch(rng, backend):
    q, k, v, _ = make_case(rng, CASES["plain"])
    torch.testing.assert_close(interop.scaled_dot_product_attention(q, k, v, backend=backend),
                               F.scaled_dot_product_attention(q, k, v))


def test_errors_name_the_value_and_the_fix(rng):
    q, k, v, _ = make_case(rng, CASES["plain"])
    with pytest.raises(NotImplementedError, match="FLASH"):
        interop.scaled_dot_product_attention(q, k, v, backend=Backend.FLASH)
    with cusdpa.sdpa_kernel(Backend.FLASH), pytest.raises(NotImplementedError, match="no cusdpa backend"):
        interop.scaled_dot_product_attention(q, k, v)
    with pytest.raises(TypeError, match="cusdpa.Backend"):
        interop.scaled_dot_product_attention(q, k, v, backend="math")
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        interop.scaled_dot_product_attention(q.detach().numpy(), k, v)
    with pytest.raises(TypeError, match="key.dtype=torch.float64"):
        interop.scaled_dot_product_attention(q, k.double(), v)
    with pytest.raises(TypeError, match="torch.int32 is not supported"):
        interop.scaled_dot_product_attention(q.int(), k.int(), v.int())
    with pytest.raises(ValueError, match="is on meta"):
        interop.scaled_dot_product_attention(q.to("meta"), k.to("meta"), v.to("meta"))
    with pytest.raises(TypeError, match="attn_mask.dtype=torch.int64"):
        interop.scaled_dot_product_attention(q, k, v, torch.ones(9, 13, dtype=torch.int64))
    with pytest.raises(TypeError, match="window="):
        interop.scaled_dot_product_attention(q, k, v, window=4)
    with pytest.raises(ValueError, match="causal_variant"):
        interop.scaled_dot_product_attention(q, k, v, causal_variant="diagonal")


@pytest.mark.parametrize("variant", ["causal_upper_left", "causal_lower_right"])
@pytest.mark.parametrize("L,S", [(5, 9), (9, 5), (6, 6)])
def test_causal_bias_selects_the_alignment_eager_overridden_and_compiled(rng, variant, L, S):
    """torch.nn.attention.bias.CausalBias is a causal alignment, as PyTorch's SDPA reads it, never a dense mask."""
    from torch.nn.attention import bias as causal_bias

    q, k, v = randn(rng, 2, 3, L, 8), randn(rng, 2, 3, S, 8), randn(rng, 2, 3, S, 8)
    dout = randn(rng, 2, 3, L, 8, grad=False)
    with warnings.catch_warnings():  # lower-right with L > S: PyTorch warns of the rows that see nothing
        warnings.simplefilter("ignore", UserWarning)
        mask = getattr(causal_bias, variant)(L, S)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    want_grads = grads_of(want, (q, k, v), dout)
    compiled, graphs = compile_capturing(lambda q, k, v, m: interop.scaled_dot_product_attention(q, k, v, attn_mask=m))
    with interop.sdpa_override():
        overridden = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    for got in (interop.scaled_dot_product_attention(q, k, v, attn_mask=mask), overridden, compiled(q, k, v, mask)):
        torch.testing.assert_close(got, want)
        for g, w in zip(grads_of(got, (q, k, v), dout), want_grads):
            torch.testing.assert_close(g, w)
    assert calls_cusdpa(graphs)


def test_causal_bias_errors_name_the_conflict(rng):
    from torch.nn.attention.bias import causal_lower_right

    q, k, v = randn(rng, 1, 2, 5, 8), randn(rng, 1, 2, 9, 8), randn(rng, 1, 2, 9, 8)
    with pytest.raises(ValueError, match="is_causal=True"):
        interop.scaled_dot_product_attention(q, k, v, causal_lower_right(5, 9), is_causal=True)
    with pytest.raises(ValueError, match="causal_variant"):
        interop.scaled_dot_product_attention(q, k, v, causal_lower_right(5, 9), causal_variant="lower_right")
    with pytest.raises(ValueError, match="for 5 queries and 7 keys"):
        interop.scaled_dot_product_attention(q, k, v, causal_lower_right(5, 7))


def test_train_gpt_example_runs_on_the_cpu(capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("train_gpt", ROOT / "examples" / "train_gpt.py")
    train_gpt = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "train_gpt", train_gpt)  # its dataclasses look themselves up there
    spec.loader.exec_module(train_gpt)
    assert train_gpt.main(["--device", "cpu", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "cusdpa::math_fwd" in out and "within the 1% tolerance" in out
