"""Hugging Face transformers integration (interop.hf) on CPU tensors (the reference backend): tiny randomly
initialised models built from configs (no downloads) with attn_implementation="cusdpa" against "sdpa", logits
and the gradients of every parameter; the attention function against transformers' sdpa function; the
registration; dropout in training mode; unsupported arguments and the fallback."""
import copy
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.integrations.sdpa_attention")
if not hasattr(transformers, "AttentionInterface"):
    pytest.skip(f"transformers {transformers.__version__} has no AttentionInterface (needs >= 4.51)",
                allow_module_level=True)

import interop.functional  # noqa: E402
import interop.hf  # noqa: E402
from transformers import AttentionInterface, AutoModel, AutoModelForCausalLM  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
# A float mask at float64's minimum over a whole row (fully padded rows; transformers < 4.53 builds float masks for
# "cusdpa"): cusdpa's reference stores that row's logsumexp (about -1.8e308) in float32, as -inf, and NumPy warns
# about the cast; the outputs are unaffected.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
VOCAB, LENGTH = 101, 16


# --- tolerances -------------------------------------------------------------------------------------------
# float32: the project's error rule (cusdpa.verify.judge): cusdpa's error against the float64 truth is at most
# 2x (3x for gradients) the error of PyTorch's SDPA at the same precision. Here the truth is the same model
# (the same weights, exactly widened) run in float64 through "sdpa", so by the triangle inequality
# |cusdpa - sdpa| <= |cusdpa - truth| + |sdpa - truth| <= 4 |sdpa - truth| (gradients; 3x for values: 4x is
# used for both), plus a floor of 64 unit roundoffs of ``scale`` for tensors sdpa happens to get exactly.
# float64: no wider truth exists on the CPU; both sides are float64 reference arithmetic whose rounding errors
# grow by at most a few hundred unit roundoffs (2.2e-16) through two layers of 16-token, 64-wide reductions,
# so 1e3 unit roundoffs of ``scale`` bounds the difference with room to spare.
# ``scale`` is the largest magnitude of the computation: the tensor's own for logits; for gradients the largest
# of all parameters' gradients, since a gradient that is zero in exact arithmetic (the key projection's bias:
# softmax ignores a constant added to a row) is nothing but the rounding of the larger values around it.
# A semantic mistake (a lost mask, wrong causality or head grouping) changes results by O(0.01 .. 1) of scale:
# orders of magnitude above these budgets (float32: typically 1e-6 .. 1e-5 of scale).
def assert_same_precision(actual, expected, truth=None, name="", scale=None):
    scale = scale or expected.detach().abs().max().item() or 1.0
    eps = torch.finfo(expected.dtype).eps
    if expected.dtype == torch.float64:
        budget = 1e3 * eps * scale
    else:
        sdpa_error = (expected.detach().double() - truth.detach()).abs().max().item()
        assert sdpa_error <= 1e3 * eps * scale, f"{name}: sdpa itself is off by {sdpa_error} (dropout left on?)"
        budget = 4 * sdpa_error + 64 * eps * scale
    torch.testing.assert_close(actual, expected, rtol=0, atol=budget, msg=lambda m: f"{name}: {m}")


# --- models ---------------------------------------------------------------------------------------------
def llama_config():
    # GQA (4 query heads, 2 kv heads), causal; initializer_range 0.3 so attention is far from uniform and a
    # wrong mask shows (at transformers' 0.02 every row attends almost uniformly).
    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    initializer_range=0.3)


def mistral_config():
    # A sliding window shorter than the sequence: transformers materialises the windowed causal mask.
    return transformers.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      sliding_window=5, initializer_range=0.3)


def bert_config():
    return transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=64, initializer_range=0.3)


def build(auto, config, implementation, dtype, state=None):
    # A copy of the config per model: from_config records the implementation on the config it is given.
    # eval(): transformers may return a model in training mode, with hidden-state dropout.
    model = auto.from_config(copy.deepcopy(config), attn_implementation=implementation).to(dtype).eval()
    if state is not None:
        model.load_state_dict(state)
    assert model.config._attn_implementation == implementation
    return model


def run(model, ids, mask, labels):
    """Logits and the gradient of every parameter of a cross-entropy loss, with the parameters' names."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask)
    logits = out.logits if hasattr(out, "logits") else out.last_hidden_state
    if labels is None:  # an encoder: a loss that weighs every valid token's features (and the pooler's) differently
        weights = torch.linspace(-1, 1, logits.shape[-1], dtype=logits.dtype)
        loss = ((logits * weights).sum(-1) * mask).sum() + (out.pooler_output * weights).sum()
    else:
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def compare(auto, config, dtype, ids, mask, labels):
    torch.manual_seed(0)
    sdpa = build(auto, config, "sdpa", dtype)
    state = sdpa.state_dict()
    cusdpa = build(auto, config, "cusdpa", dtype, state)
    expected, expected_grads = run(sdpa, ids, mask, labels)
    actual, actual_grads = run(cusdpa, ids, mask, labels)
    truth, truth_grads = (None, {})
    if dtype != torch.float64:
        truth, truth_grads = run(build(auto, config, "sdpa", torch.float64, state), ids, mask, labels)
    assert torch.isfinite(actual).all(), "cusdpa produced NaN or inf (padded positions?)"
    assert_same_precision(actual, expected, truth, "logits")
    assert expected_grads.keys() == actual_grads.keys() and len(actual_grads) == len(list(cusdpa.parameters()))
    scale = max(g.abs().max().item() for g in expected_grads.values())
    for name, grad in actual_grads.items():
        assert torch.isfinite(grad).all(), name
        assert_same_precision(grad, expected_grads[name], truth_grads.get(name), name, scale)
    return expected, actual


def decoder_inputs(padding):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, LENGTH), generator=gen)
    mask = torch.ones(3, LENGTH, dtype=torch.long)
    if padding:  # left padding, as for batched generation: rows 1 and 2 start late
        mask[1, :5] = 0
        mask[2, :11] = 0
    labels = torch.where(mask.bool(), torch.roll(ids, -1, 1), -100)
    return ids, mask, labels


class Calls:
    """Records the arguments of each interop.scaled_dot_product_attention call that interop.hf makes."""

    def __init__(self, monkeypatch):
        self.calls = []
        original = interop.functional.scaled_dot_product_attention

        def spy(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                **kwargs):
            self.calls.append(dict(q_heads=query.shape[1], kv_heads=key.shape[1], attn_mask=attn_mask,
                                   dropout_p=dropout_p, is_causal=is_causal, enable_gqa=enable_gqa))
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, **kwargs)

        monkeypatch.setattr(interop.functional, "scaled_dot_product_attention", spy)


# --- registration ----------------------------------------------------------------------------------------
def test_registered_on_import_and_idempotent():
    interface = AttentionInterface()
    assert "cusdpa" in interface and interface["cusdpa"] is interop.hf.attention_forward
    assert "cusdpa" in transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS
    before = dict(AttentionInterface())
    interop.hf.register()
    interop.hf.register()
    assert dict(AttentionInterface()) == before
    masks = interop.hf._mask_interface()
    if masks is not None:  # transformers >= 4.53: "cusdpa" builds its masks as "sdpa" does
        assert masks()["cusdpa"] is masks()["sdpa"]


# --- whole models -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("padding", [False, True], ids=["dense", "left_padding"])
def test_llama_decoder_matches_sdpa(dtype, padding, monkeypatch):
    calls = Calls(monkeypatch)
    compare(AutoModelForCausalLM, llama_config(), dtype, *decoder_inputs(padding))
    assert len(calls.calls) == 2  # one per layer: every attention of the cusdpa model went through cusdpa
    for call in calls.calls:
        # Native GQA: key/value reach cusdpa with their 2 heads, never repeated to the query's 4.
        assert call["q_heads"] == 4 and call["kv_heads"] == 2 and call["enable_gqa"]
        if not padding and interop.hf._mask_interface() is not None:
            # A purely causal batch: no dense mask, cusdpa's own causal (FLASH's fast path on a GPU). Before
            # transformers 4.53 (no mask interface) models build a float causal mask for any implementation
            # but "sdpa".
            assert call["attn_mask"] is None and call["is_causal"]
        if padding:
            assert call["attn_mask"] is not None and not call["is_causal"]


@pytest.mark.parametrize("padding", [False, True], ids=["dense", "left_padding"])
def test_llama_generate_matches_sdpa(padding):
    # Prefill, then decoding one token at a time from the KV cache (L = 1 against S keys: never causal).
    ids, mask, _ = decoder_inputs(padding)
    torch.manual_seed(0)
    sdpa = build(AutoModelForCausalLM, llama_config(), "sdpa", torch.float64)
    cusdpa = build(AutoModelForCausalLM, llama_config(), "cusdpa", torch.float64, sdpa.state_dict())
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                  output_scores=True)
    expected, actual = sdpa.generate(ids, **kwargs), cusdpa.generate(ids, **kwargs)
    assert torch.equal(actual.sequences, expected.sequences)
    for step, (a, e) in enumerate(zip(actual.scores, expected.scores)):
        # generate() rounds the float64 logits to float32: values within float64 rounding of each other round
        # to the same or adjacent float32 numbers, one float32 ulp of the largest score apart at most.
        ulp = torch.finfo(torch.float32).eps * e.abs().max().item()
        torch.testing.assert_close(a, e, rtol=0, atol=ulp, msg=lambda m: f"scores of new token {step}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_sliding_window_decoder_matches_sdpa(dtype, monkeypatch):
    calls = Calls(monkeypatch)
    compare(AutoModelForCausalLM, mistral_config(), dtype, *decoder_inputs(padding=True))
    assert calls.calls and all(c["attn_mask"] is not None for c in calls.calls)  # the window is in the mask


needs_bert_interface = pytest.mark.skipif(
    TRANSFORMERS_MAJOR < 5, reason=f"BERT calls the AttentionInterface from transformers 5 "
                                   f"(installed: {transformers.__version__})")


@needs_bert_interface
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("padding", [False, True], ids=["dense", "padding"])
def test_bert_encoder_matches_sdpa(dtype, padding, monkeypatch):
    calls = Calls(monkeypatch)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (3, LENGTH), generator=gen)
    mask = torch.ones(3, LENGTH, dtype=torch.long)
    if padding:  # right padding; row 2 is mostly padding
        mask[1, 12:] = 0
        mask[2, 3:] = 0
    _, actual = compare(AutoModel, bert_config(), dtype, ids, mask, None)
    assert torch.isfinite(actual).all()  # padded positions included
    assert len(calls.calls) == 2
    for call in calls.calls:
        assert not call["is_causal"] and (call["attn_mask"] is not None) == padding


@needs_bert_interface
def test_training_mode_dropout_reaches_cusdpa(monkeypatch):
    calls = Calls(monkeypatch)
    config = bert_config()
    config.attention_probs_dropout_prob = 0.25
    model = build(AutoModel, config, "cusdpa", torch.float32).train()
    ids = torch.randint(0, VOCAB, (2, LENGTH))
    mask = torch.ones(2, LENGTH, dtype=torch.long)
    mask[1, 10:] = 0

    def step(seed):
        torch.manual_seed(seed)
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        out.sum().backward()
        return out.detach()

    first, again, other = step(3), step(3), step(4)
    assert calls.calls and all(c["dropout_p"] == 0.25 for c in calls.calls)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    torch.testing.assert_close(first, again, rtol=0, atol=0)  # the keep-mask follows torch.manual_seed
    assert not torch.equal(first, other)
    calls.calls.clear()
    model.eval()
    model(input_ids=ids, attention_mask=mask)
    assert calls.calls and all(c["dropout_p"] == 0.0 for c in calls.calls)


def test_llama_training_mode_dropout(monkeypatch):
    calls = Calls(monkeypatch)
    config = llama_config()
    config.attention_dropout = 0.5
    model = build(AutoModelForCausalLM, config, "cusdpa", torch.float32).train()
    ids, mask, labels = decoder_inputs(padding=True)
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert calls.calls and all(c["dropout_p"] == 0.5 for c in calls.calls)


# --- the attention function against transformers' sdpa function ----------------------------------------
class Module(torch.nn.Module):
    def __init__(self, is_causal=True, groups=1):
        super().__init__()
        self.is_causal = is_causal
        self.num_key_value_groups = groups


def qkv(b, hq, hkv, lq, lk, d=8, dtype=torch.float64):
    gen = torch.Generator().manual_seed(hq * 100 + lq * 10 + lk)
    return [torch.randn(b, h, n, d, generator=gen, dtype=dtype) for h, n in ((hq, lq), (hkv, lk), (hkv, lk))]


def padding_bool_mask(b, lq, lk):
    valid = torch.ones(b, lk, dtype=torch.bool)
    valid[0, : lk // 3] = False
    return valid[:, None, None, :].expand(b, 1, lq, lk)


@pytest.mark.parametrize("case", [
    dict(),                                         # purely causal: is_causal from module.is_causal
    dict(module_causal=False),                      # an encoder without a mask
    dict(is_causal=False),                          # the argument wins over module.is_causal
    dict(mask="bool"),
    dict(mask="float"),
    dict(mask="float", mask_longer=True),           # a static cache's mask, longer than the keys
    dict(lq=1, lk=9),                               # decoding one token: never causal
    dict(lq=5, lk=9),                               # prefill into an empty static cache: keys sliced
    dict(hq=4, hkv=4),
], ids=str)
def test_attention_forward_matches_sdpa_function(case):
    hq, hkv = case.get("hq", 4), case.get("hkv", 2)
    lq, lk = case.get("lq", 7), case.get("lk", 7)
    q, k, v = qkv(2, hq, hkv, lq, lk)
    module = Module(case.get("module_causal", True), hq // hkv)
    mask = None
    if case.get("mask"):
        mask_lk = lk + 3 if case.get("mask_longer") else lk
        mask = padding_bool_mask(2, lq, mask_lk) & torch.ones(lq, mask_lk, dtype=torch.bool).tril()
        if case["mask"] == "float":
            mask = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, torch.finfo(q.dtype).min)
    kwargs = dict(dropout=0.0, scaling=0.3)
    if "is_causal" in case:
        kwargs["is_causal"] = case["is_causal"]
    actual, weights = interop.hf.attention_forward(module, q, k, v, mask, **kwargs)
    sdpa_mask = None if mask is None else mask[..., :lk]  # transformers >= 4.53's sdpa takes masks of S keys
    if not module.is_causal:  # transformers 4.51's sdpa ignores module.is_causal; it reads the argument
        kwargs["is_causal"] = False
    expected, expected_weights = sdpa_attention_forward(module, q, k, v, sdpa_mask, **kwargs)
    assert weights is None and expected_weights is None
    assert actual.shape == expected.shape == (2, lq, hq, 8) and actual.is_contiguous()
    assert_same_precision(actual, expected)


def test_position_bias_matches_sdpa_function():
    import inspect

    if "position_bias" not in inspect.signature(sdpa_attention_forward).parameters:
        pytest.skip(f"transformers {transformers.__version__}'s sdpa takes no position_bias")
    q, k, v = qkv(2, 4, 4, 6, 6)
    bias = torch.randn(1, 4, 6, 6, dtype=q.dtype, requires_grad=True)
    for mask, is_causal in ((None, True), (None, False), (padding_bool_mask(2, 6, 6), None)):
        module = Module(is_causal=True)
        expected, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3, is_causal=is_causal,
                                             position_bias=bias)
        (g_expected,) = torch.autograd.grad(expected.sum(), bias)
        actual, _ = interop.hf.attention_forward(module, q, k, v, mask, scaling=0.3, is_causal=is_causal,
                                                 position_bias=bias)
        (g_actual,) = torch.autograd.grad(actual.sum(), bias)
        assert_same_precision(actual, expected)
        assert_same_precision(g_actual, g_expected)  # cusdpa gives the float mask its gradient


# --- what it does not take -------------------------------------------------------------------------------
def test_head_mask_raises():
    q, k, v = qkv(1, 2, 2, 4, 4)
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        interop.hf.attention_forward(Module(), q, k, v, None, head_mask=torch.ones(2))


def test_softcap_is_computed():
    """Gemma-2's soft-capping, where transformers' sdpa raises: the capped scores, as eager attention has them."""
    q, k, v = qkv(1, 4, 2, 5, 5)
    out, _ = interop.hf.attention_forward(Module(groups=2), q, k, v, None, scaling=0.5, softcap=1.5)
    s = 1.5 * torch.tanh((q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.5 / 1.5)
    s = s.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), -torch.inf)
    expected = (torch.softmax(s, -1) @ v.repeat_interleave(2, 1)).transpose(1, 2)
    assert_same_precision(out, expected)


def test_output_attentions_warns_once_and_returns_no_weights():
    interop.hf._warned.clear()
    q, k, v = qkv(1, 2, 2, 4, 4)
    with pytest.warns(UserWarning, match="output_attentions"):
        _, weights = interop.hf.attention_forward(Module(), q, k, v, None, output_attentions=True)
    assert weights is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        interop.hf.attention_forward(Module(), q, k, v, None, output_attentions=True)  # no second warning


def test_unsupported_inputs_fall_back_to_sdpa():
    interop.hf._warned.clear()
    q, k, v = (t.to("meta") for t in qkv(1, 4, 2, 5, 5, dtype=torch.float32))
    with pytest.warns(UserWarning, match="falling back to transformers' 'sdpa'"):
        out, _ = interop.hf.attention_forward(Module(groups=2), q, k, v, None)
    assert out.device.type == "meta" and out.shape == (1, 5, 4, 8)


@pytest.mark.slow
def test_compiled_llama_matches_compiled_sdpa():
    # torch.compile traces interop.hf.attention_forward and cusdpa's ops without graph breaks (about 20 s of
    # compiling on a CPU). Both models are compiled: Inductor alone moves this float64 model's logits by ~1e-5
    # against eager mode (measured with "sdpa" compiled and not; parts of the model, such as Llama's rotary
    # embedding, run in float32), far beyond the float64 budget, and identically for either attention.
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ids, mask, _ = decoder_inputs(padding=True)
    torch.manual_seed(0)
    sdpa = build(AutoModelForCausalLM, llama_config(), "sdpa", torch.float64)
    cusdpa = build(AutoModelForCausalLM, llama_config(), "cusdpa", torch.float64, sdpa.state_dict())
    sdpa, cusdpa = torch.compile(sdpa), torch.compile(cusdpa)
    for m in (None, mask):
        assert_same_precision(cusdpa(input_ids=ids, attention_mask=m).logits,
                              sdpa(input_ids=ids, attention_mask=m).logits, name="compiled logits")
    assert not torch._dynamo.utils.counters["graph_break"]
