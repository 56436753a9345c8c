"""Whole Hugging Face models with attn_implementation="cusdpa" against "sdpa": logits check, then the time of
a training step (forward + loss + backward).

    python benchmarks/hf_models.py [--models llama,llama-padded,bert] [--reps 10] [--warmup 3] [--quick]

Needs a CUDA GPU, CuPy and transformers: ``pip install -e ".[hf,cuda]"``. Without a CUDA GPU it says so and
exits 0; without transformers or CuPy it says what to install and exits 1.

Models, randomly initialised from configs (nothing is downloaded), bf16 on CUDA, two copies with the same
weights, one per implementation:

- ``llama``: Llama-style decoder, hidden 2048, 16 heads (head dim 128), 4 KV heads (GQA), MLP 5504, 4 layers,
  vocab 32000; batch 4 x 2048 tokens, no padding. transformers passes no mask, so cusdpa runs causal and GQA
  natively (FLASH); sdpa runs PyTorch's flash kernel with enable_gqa (transformers >= 4.56; before, repeat_kv).
  Before transformers 4.53 (no mask interface) a dense float causal mask reaches cusdpa instead.
- ``llama-padded``: the same with left padding (about 25% of the tokens): a 4-D bool mask reaches both
  implementations (cusdpa: EFFICIENT, GQA native; sdpa: repeat_kv and a masked kernel).
- ``bert``: BERT-style encoder with its masked-LM head, hidden 1024, 16 heads (head dim 64), MLP 4096, 4 layers,
  vocab 30522; batch 16 x 512 tokens with about 25% right padding (a bool padding mask).

The check: logits of both bf16 models, in eval mode, against the same model in float32 run by "sdpa" (the
truth), over the non-padded tokens; cusdpa's largest error may be at most 2x sdpa's plus bf16's unit roundoff
of the largest logit (the project's error rule). The attention call cusdpa receives is printed (mask, causal,
GQA). Timing: train mode with dropout off, gradients set to None before each step, ``--warmup`` steps of each,
then ``--reps`` steps of each, the two implementations alternating step by step so drift in clocks hits both
alike; each step timed with CUDA events; the table gives medians (ms per step), cusdpa / sdpa, and the memory a
step allocates above the resident models. Exits 1 if a check failed or a model did not run (after running the
others). BERT needs transformers >= 5 (earlier versions' BERT does not call the AttentionInterface); with an
older transformers it is skipped.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys

DEVICE = "cuda"  # a name, so that the script's logic can be exercised on a CPU by setting it


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    family: str  # "llama" or "bert"
    batch: int
    length: int
    padding: str | None  # None, "left" or "right"
    layers: int


SPECS = {
    "llama": Spec("llama", "llama", 4, 2048, None, 4),
    "llama-padded": Spec("llama-padded", "llama", 4, 2048, "left", 4),
    "bert": Spec("bert", "bert", 16, 512, "right", 4),
}
QUICK = {"llama": dict(batch=2, length=512, layers=2), "bert": dict(batch=4, length=256, layers=2)}


def config(transformers, spec: Spec):
    if spec.family == "llama":
        return transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5504,
                                        num_hidden_layers=spec.layers, num_attention_heads=16, num_key_value_heads=4,
                                        max_position_embeddings=max(4096, spec.length), attention_dropout=0.0)
    return transformers.BertConfig(vocab_size=30522, hidden_size=1024, intermediate_size=4096,
                                   num_hidden_layers=spec.layers, num_attention_heads=16,
                                   max_position_embeddings=max(512, spec.length), hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0)


def inputs(torch, spec: Spec, vocab: int):
    """input_ids, attention_mask (0 = padding), labels (-100 = no loss) on CUDA, the same every run."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (spec.batch, spec.length), generator=gen)
    mask = torch.ones(spec.batch, spec.length, dtype=torch.long)
    if spec.padding:  # lengths evenly spread over [L/2, L] in a random order: 25% padding
        lengths = torch.linspace(spec.length / 2, spec.length, spec.batch).round().long()
        lengths = lengths[torch.randperm(spec.batch, generator=gen)]
        for b, n in enumerate(lengths.tolist()):
            if spec.padding == "left":
                mask[b, : spec.length - n] = 0
            else:
                mask[b, n:] = 0
    if spec.family == "llama":
        labels = ids.masked_fill(mask == 0, -100)  # the model shifts them
    else:  # masked LM: 15% of the real tokens carry a label
        chosen = (torch.rand(ids.shape, generator=gen) < 0.15) & (mask == 1)
        labels = ids.masked_fill(~chosen, -100)
    return ids.to(DEVICE), mask.to(DEVICE), labels.to(DEVICE)


def build(torch, auto, cfg, implementation, dtype, state=None):
    with torch.device(DEVICE):  # initialise on the GPU: seconds instead of a minute on the host
        model = auto.from_config(copy.deepcopy(cfg), attn_implementation=implementation)
    model = model.to(device=DEVICE, dtype=dtype)
    if state is not None:
        model.load_state_dict(state)
    return model


def record_calls(interop):
    """Wrap interop.scaled_dot_product_attention (which interop.hf calls) to note the arguments it gets."""
    calls, original = [], interop.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
            **kwargs):
        mask = "none" if attn_mask is None else f"{str(attn_mask.dtype).removeprefix('torch.')} {tuple(attn_mask.shape)}"
        calls.append(f"mask {mask}, is_causal={is_causal}, enable_gqa={enable_gqa} "
                     f"(q heads {query.shape[1]}, kv heads {key.shape[1]})")
        return original(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, **kwargs)

    interop.functional.scaled_dot_product_attention = spy
    return calls, lambda: setattr(interop.functional, "scaled_dot_product_attention", original)


def check(torch, interop, models, truth, ids, mask) -> tuple[bool, str]:
    """Largest logit error over real tokens of cusdpa and sdpa (bf16) against the float32 truth."""
    valid = mask.bool()
    with torch.no_grad():
        ref = truth(input_ids=ids, attention_mask=mask).logits.float()[valid]
        errors = {}
        for impl, model in models.items():
            model.eval()
            calls, restore = record_calls(interop) if impl == "cusdpa" else ([], lambda: None)
            try:
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
            finally:
                restore()
            errors[impl] = (logits[valid] - ref).abs().max().item()
            if impl == "cusdpa":
                print(f"  cusdpa receives: {calls[0] if calls else 'NO CALL (not routed to cusdpa!)'}")
                if not calls:
                    return False, "cusdpa was not called"
            if not torch.isfinite(logits[valid]).all():
                errors[impl] = float("nan")
    scale = ref.abs().max().item()
    floor = 2.0 ** -8 * scale  # bf16 unit roundoff of the largest logit
    ok = errors["cusdpa"] <= 2 * errors["sdpa"] + floor  # False for NaN
    return ok, (f"max |logits - fp32 truth| over real tokens: cusdpa {errors['cusdpa']:.4g}, sdpa {errors['sdpa']:.4g}"
                f" (largest logit {scale:.3g}; allowed {2 * errors['sdpa'] + floor:.3g}) -> "
                f"{'ok' if ok else 'MISMATCH'}")


def step_fn(model, ids, mask, labels):
    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    return step


def time_steps(torch, steps: dict, warmup: int, reps: int) -> dict:
    """Median ms per step of each function; the functions alternate step by step."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    torch.cuda.synchronize()
    events = {name: [] for name in steps}
    names = list(steps)
    for r in range(reps):
        for name in names if r % 2 == 0 else names[::-1]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            steps[name]()
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize()
    return {name: statistics.median(s.elapsed_time(e) for s, e in pairs) for name, pairs in events.items()}


def step_memory(torch, step) -> float:
    """GiB a step allocates at its peak above what was allocated before it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**30


def run_spec(torch, transformers, interop, spec: Spec, args) -> tuple[dict, bool]:
    cfg = config(transformers, spec)
    auto = transformers.AutoModelForCausalLM if spec.family == "llama" else transformers.AutoModelForMaskedLM
    ids, mask, labels = inputs(torch, spec, cfg.vocab_size)
    padding = 1 - mask.float().mean().item()
    print(f"\n{spec.name}: {spec.layers} layers, batch {spec.batch} x {spec.length} tokens, "
          f"{padding:.0%} padding ({spec.padding or 'none'})")
    torch.manual_seed(0)
    truth = build(torch, auto, cfg, "sdpa", torch.float32).eval()
    # The bf16 weights for both bf16 models, and the truth gets them exactly widened (integer buffers such as
    # BERT's position ids stay as they are).
    state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in truth.state_dict().items()}
    truth.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    models = {impl: build(torch, auto, cfg, impl, torch.bfloat16, state) for impl in ("cusdpa", "sdpa")}
    ok, line = check(torch, interop, models, truth, ids, mask)
    print("  " + line)
    del truth
    torch.cuda.empty_cache()
    steps = {}
    for impl, model in models.items():
        model.train()
        steps[impl] = step_fn(model, ids, mask, labels)
    ms = time_steps(torch, steps, args.warmup, args.reps)
    memory = {impl: step_memory(torch, step) for impl, step in steps.items()}
    row = dict(model=spec.name, tokens=f"{spec.batch}x{spec.length}", cusdpa_ms=ms["cusdpa"], sdpa_ms=ms["sdpa"],
               ratio=ms["cusdpa"] / ms["sdpa"], cusdpa_gib=memory["cusdpa"], sdpa_gib=memory["sdpa"],
               check="ok" if ok else "MISMATCH")
    print(f"  step: cusdpa {ms['cusdpa']:.1f} ms, sdpa {ms['sdpa']:.1f} ms")
    del models, steps
    torch.cuda.empty_cache()
    return row, ok


def table(rows) -> str:
    head = ("model", "tokens", "cusdpa ms/step", "sdpa ms/step", "cusdpa / sdpa", "cusdpa step GiB", "sdpa step GiB",
            "logits check")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = (r["model"], r["tokens"], f"{r['cusdpa_ms']:.1f}", f"{r['sdpa_ms']:.1f}", f"{r['ratio']:.2f}x",
                 f"{r['cusdpa_gib']:.2f}", f"{r['sdpa_gib']:.2f}", r["check"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(SPECS), help=f"comma-separated, of {', '.join(SPECS)}")
    parser.add_argument("--reps", type=int, default=10, help="timed steps per implementation (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per implementation first (default 3)")
    parser.add_argument("--layers", type=int, help="layers of every model (default 4)")
    parser.add_argument("--quick", action="store_true", help="small sizes and 2 layers: a smoke run")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(SPECS)}")

    try:
        import torch
    except ImportError:
        print("hf_models: torch is not installed; nothing to benchmark (pip install -e '.[hf,cuda]').")
        return 0
    if not torch.cuda.is_available():
        print("hf_models: no CUDA GPU is available to torch; this benchmark runs on CUDA only. Nothing to do.")
        return 0
    from cusdpa import environment

    problem = environment.cupy_problem()
    if problem:
        print(f"hf_models: cusdpa cannot run on this GPU: {problem}")
        return 1
    try:
        import transformers

        import interop
        import interop.hf  # noqa: F401  (registers attn_implementation="cusdpa")
    except ImportError as e:
        print(f"hf_models: {e}\nInstall the extra: pip install -e '.[hf,cuda]'")
        return 1

    versions = environment.versions()
    print(f"GPU: {torch.cuda.get_device_name()}; torch {versions['torch']}, transformers {transformers.__version__}, "
          f"cupy {versions.get('cupy-cuda13x', versions.get('cupy-cuda12x', '?'))}")
    rows, all_ok = [], True
    for name in names:
        spec = SPECS[name]
        if args.quick:
            spec = dataclasses.replace(spec, **QUICK[spec.family])
        if args.layers:
            spec = dataclasses.replace(spec, layers=args.layers)
        if spec.family == "bert" and int(transformers.__version__.split(".")[0]) < 5:
            print(f"\n{spec.name}: skipped: BERT calls the AttentionInterface from transformers 5 "
                  f"(installed: {transformers.__version__})")
            continue
        try:
            row, ok = run_spec(torch, transformers, interop, spec, args)
        except Exception as e:  # one model failing (out of memory, an unsupported config) leaves the others
            print(f"  {spec.name} failed: {type(e).__name__}: {e}")
            torch.cuda.empty_cache()
            all_ok = False
            continue
        rows.append(row)
        all_ok &= ok
    print(f"\nForward + loss + backward per training step, bf16, median of {args.reps} steps after {args.warmup} "
          "warm-up steps (cusdpa / sdpa < 1: cusdpa faster):\n")
    print(table(rows))
    if not all_ok:
        print("\nA logits check failed or a model did not run (see above).")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
