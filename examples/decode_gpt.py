"""Greedy generation with train_gpt's model through cusdpa's KV cache (interop.kv_cache_attention), against
PyTorch's SDPA over a static cache: the same weights, the same prompt, tokens per second of each, and
whether they generate the same tokens.

    python examples/decode_gpt.py --device cuda                 # nanoGPT's shakespeare-char size, bf16
    python examples/decode_gpt.py --device cpu --new-tokens 4   # the toy model; cusdpa runs its reference

The prompt is prefilled through the same call (its keys and values written into the empty cache, causal
attention over them); each next token is one query per sequence attending to its cached keys. The weights
are train_gpt's initialisation (no training: the point is the decode path, not the text). Exits with
status 1 when the two decoders' logits, both fed PyTorch's greedy tokens, differ by more than the dtype's
rounding explains, or a token differs where PyTorch's two best logits are not a near-tie.
"""
from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys
import time

import torch
from torch.nn import functional as F

import interop

_TRAIN_GPT = pathlib.Path(__file__).resolve().parent / "train_gpt.py"


def _train_gpt():
    spec = importlib.util.spec_from_file_location("train_gpt", _TRAIN_GPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_gpt", module)
    spec.loader.exec_module(module)
    return module


class Decoder:
    """The GPT's forward over new tokens at positions [pos, pos + n), keys and values kept per layer in
    (B, S_max, H, D) caches; ``attention`` is "cusdpa" (kv_cache_attention) or "torch" (F.sdpa on the
    cache's first pos + n positions)."""

    def __init__(self, model, batch: int, max_len: int, attention: str, dtype):
        self.model, self.attention = model, attention
        blk = model.blocks[0].attn
        self.heads, self.dim = blk.num_heads, blk.embed_dimension // blk.num_heads
        shape = (batch, max_len, self.heads, self.dim)
        device = model.wte.weight.device
        self.caches = [(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
                       for _ in model.blocks]

    def attend(self, layer: int, q, k, v, pos: int):
        k_cache, v_cache = self.caches[layer]
        if self.attention == "cusdpa":
            return interop.kv_cache_attention(q, k_cache, v_cache, pos, k, v, is_causal=True)
        n = q.shape[1]
        k_cache[:, pos:pos + n], v_cache[:, pos:pos + n] = k, v
        keys, values = (c[:, :pos + n].transpose(1, 2) for c in (k_cache, v_cache))
        mask = torch.ones(n, pos + n, dtype=torch.bool, device=q.device).tril(pos)  # bottom-right causal
        return F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask).transpose(1, 2)

    @torch.no_grad()
    def logits(self, idx, pos: int):
        """Logits of the last of the tokens ``idx`` (B, n) at positions pos.. pos + n - 1."""
        m = self.model
        B, n = idx.shape
        x = m.wte(idx) + m.wpe(torch.arange(pos, pos + n, device=idx.device))
        for layer, block in enumerate(m.blocks):
            a = block.attn
            q, k, v = (t.reshape(B, n, self.heads, self.dim) for t in a.c_attn(block.ln_1(x)).chunk(3, -1))
            y = self.attend(layer, q, k, v, pos).reshape(B, n, -1)
            x = x + a.c_proj(y)
            x = x + block.mlp(block.ln_2(x))
        return m.lm_head(m.ln_f(x[:, -1]))


def generate(decoder: Decoder, prompt, new_tokens: int) -> tuple[torch.Tensor, float]:
    """Greedy tokens (B, new_tokens) and the decode rate (tokens/s over the batch, prefill excluded)."""
    out = [decoder.logits(prompt, 0).argmax(-1)]
    _sync(prompt.device)
    start = time.perf_counter()
    for i in range(1, new_tokens):
        out.append(decoder.logits(out[-1][:, None], prompt.shape[1] + i - 1).argmax(-1))
    _sync(prompt.device)
    rate = prompt.shape[0] * (new_tokens - 1) / max(time.perf_counter() - start, 1e-9)
    return torch.stack(out, 1), rate


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="sequences (default: 32 on cuda, 2 on cpu)")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default: 64 on cuda, 8 on cpu)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated (default: 128 on cuda, 6 on cpu)")
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch or (32 if cuda else 2)
    prompt_len = args.prompt or (64 if cuda else 8)
    new_tokens = args.new_tokens or (128 if cuda else 6)
    train_gpt = _train_gpt()
    cfg = train_gpt.PRESETS["cuda" if cuda else "cpu"]
    if prompt_len + new_tokens > cfg.block_size:
        p.error(f"--prompt + --new-tokens must be at most the model's block size {cfg.block_size}")
    data, vocab = train_gpt.load_text(device)
    torch.manual_seed(args.seed)
    dtype = torch.bfloat16 if cuda else torch.float32
    model = train_gpt.GPT(cfg, vocab, "cusdpa").to(device=device, dtype=dtype).eval()
    starts = torch.randint(len(data) - prompt_len, (batch,), generator=torch.Generator().manual_seed(args.seed))
    prompt = data[starts.to(device)[:, None] + torch.arange(prompt_len, device=device)]
    max_len = prompt_len + new_tokens
    results = {}
    for attention in ("cusdpa", "torch"):
        generate(Decoder(model, batch, max_len, attention, dtype), prompt, min(new_tokens, 3))  # warm: compile
        results[attention] = generate(Decoder(model, batch, max_len, attention, dtype), prompt, new_tokens)
    ours, theirs = results["cusdpa"][0], results["torch"][0]
    # Greedy decoding from untrained weights meets near-ties, where the last bit of bf16 decides a token. So
    # both decoders are fed PyTorch's tokens and their logits compared step by step: a token may differ only
    # where PyTorch's two best logits lie closer than the two decoders' logits differ.
    logits = {attention: teacher_forced(Decoder(model, batch, max_len, attention, dtype), prompt, theirs)
              for attention in results}
    ref, got = logits["torch"].float(), logits["cusdpa"].float()
    diff = (got - ref).abs().amax(-1)  # (B, steps)
    top2 = ref.topk(2, -1).values
    explained = (got.argmax(-1) == theirs) | (top2[..., 0] - top2[..., 1] <= 2 * diff)
    rel = ((got - ref).norm() / ref.norm()).item()
    bound = 2e-2 if dtype == torch.bfloat16 else 1e-4
    agree = bool(explained.all()) and rel < bound
    print(f"batch {batch}, prompt {prompt_len}, {new_tokens} new tokens, {dtype}, {device}")
    for attention, (_, rate) in results.items():
        print(f"  {attention:7s} {rate:10.1f} tokens/s")
    print(f"  logits on PyTorch's tokens: relative difference {rel:.1e} (bound {bound:.0e}), largest {diff.max():.3f}; "
          f"greedy tokens equal: {bool((ours == theirs).all())}; every difference a near-tie: {bool(explained.all())}")
    return 0 if agree else 1


def teacher_forced(decoder: Decoder, prompt, tokens) -> torch.Tensor:
    """Logits (B, steps, vocab) of each step fed ``tokens`` (B, steps) after the prompt."""
    out = [decoder.logits(prompt, 0)]
    for i in range(1, tokens.shape[1]):
        out.append(decoder.logits(tokens[:, i - 1:i], prompt.shape[1] + i - 1))
    return torch.stack(out, 1)


if __name__ == "__main__":
    raise SystemExit(main())
