"""Masked attention, cusdpa against PyTorch's default SDPA given the same mask, in one process: the masks
issue's three shapes (and the same shapes unmasked, for scale).

    python benchmarks/masks.py [--backward] [--profile] [--config FIELD=INT ...]

Shapes (bf16): a bool mask (B, 1, L, S), B=4 H=16 L=S=4096 E=128, a quarter of its entries False; a float
mask (1, H, L, S) of the same problem (normal values); a key-padding bool mask (B, 1, 1, S) as Hugging
Face models pass it, B=8 H=16 L=2048 E=64, the last 25% of each sequence's keys padding; the float mask
again as a learnable bias (with ``--backward`` its gradient is computed too); and a bool mask
whose 128 x 128 blocks are 90% all False (the masks issue's block-sparsity bar: at least 5x faster than the
unmasked shape). ``--config`` overrides FlashConfig fields for every call: ``fwd90_mask_blocks=0`` reads every
block's mask, ``fwd90_persistent=0`` launches a CTA per tile. ``--profile`` prints the GPU kernels of ten
masked cusdpa calls of each shape (torch.profiler; with ``--backward`` of ten forward + backward calls too), to
tell the mask's summary from the attention. ``--only
TEXT`` keeps the shapes whose name holds TEXT; ``--calls N`` times nothing but makes N masked cusdpa calls of
each (forward, or forward + backward with ``--backward``): a target for benchmarks/ncu_profile.sh.
Each call's output is compared with PyTorch's (relative Frobenius error) before it is timed; times are medians of
triton.testing.do_bench (L2 flushed). TF/s count the dense products (4 B H L S E forward, 2.5x that
forward + backward), as PyTorch's own benchmarks do, whatever the mask hides.
"""
from __future__ import annotations

import argparse
import dataclasses

import torch
import triton

import interop
from benchmarks.bench.timing import print_kernels
from cusdpa.backends.flash import launches


def shapes():
    g = torch.Generator(device="cuda").manual_seed(0)

    def qkv(B, H, L, E):
        return [torch.randn(B, H, L, E, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)]

    B, H, L, E = 4, 16, 4096, 128
    yield "bool (B,1,L,S)", qkv(B, H, L, E), torch.rand(B, 1, L, L, device="cuda", generator=g) > 0.25
    bias = torch.randn(1, H, L, L, device="cuda", generator=g, dtype=torch.bfloat16)
    yield "float (1,H,L,S)", qkv(B, H, L, E), bias
    yield "learnable bias (1,H,L,S)", qkv(B, H, L, E), bias
    B, H, L, E = 8, 16, 2048, 64
    pad = torch.ones(B, 1, 1, L, dtype=torch.bool, device="cuda")
    pad[..., 3 * L // 4:] = False
    yield "key padding (B,1,1,S)", qkv(B, H, L, E), pad
    B, H, L, E = 4, 16, 4096, 128
    blocks = torch.rand(B, 1, L // 128, L // 128, device="cuda", generator=g) < 0.1
    blocks[..., torch.arange(L // 128), torch.arange(L // 128)] = True  # every query sees some key
    sparse = blocks.repeat_interleave(128, -2).repeat_interleave(128, -1)
    yield "90% empty blocks (B,1,L,S)", qkv(B, H, L, E), sparse


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backward", action="store_true", help="also time forward + backward")
    ap.add_argument("--profile", action="store_true", help="the GPU kernels of each masked call")
    ap.add_argument("--only", default="", metavar="TEXT", help="the shapes whose name holds TEXT")
    ap.add_argument("--calls", type=int, default=0, metavar="N", help="make N masked calls of each shape, time none")
    ap.add_argument("--config", nargs="*", default=[], metavar="FIELD=INT",
                    help="FlashConfig fields to override, e.g. fwd90_mask_blocks=0 fwd90_persistent=0")
    args = ap.parse_args()
    if args.config:
        changes = {field: int(value) for field, value in (item.split("=") for item in args.config)}
        config = launches.config
        launches.config = lambda pr: dataclasses.replace(config(pr), **changes)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    rows = []
    for name, (q, k, v), mask in shapes():
        if args.only not in name:
            continue
        if args.calls:
            _calls(args.calls, args.backward, q, k, v, mask)
            continue
        B, H, L, E = q.shape
        ours, theirs = interop.scaled_dot_product_attention(q, k, v, mask), sdpa(q, k, v, mask)
        err = ((ours.float() - theirs.float()).norm() / theirs.float().norm()).item()
        flops = 4 * B * H * L * L * E
        if args.profile:
            print_kernels(name, lambda: interop.scaled_dot_product_attention(q, k, v, mask))
            if args.backward:
                qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
                print_kernels(f"{name}, forward + backward",
                              lambda: interop.scaled_dot_product_attention(qg, kg, vg, mask).backward(q))
        for label, m in ((name, mask),) + (() if name.startswith("learnable") else ((f"{name}, no mask", None),)):
            fwd = [triton.testing.do_bench(lambda f=f: f(q, k, v, m)) for f in (interop.scaled_dot_product_attention, sdpa)]
            row = [label, err if m is not None else float("nan"), *fwd]
            if args.backward:
                qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
                mg = m.detach().requires_grad_() if m is not None and name.startswith("learnable") else m
                dout = torch.randn_like(q)
                both = [triton.testing.do_bench(lambda f=f: f(qg, kg, vg, mg).backward(dout),
                                                grad_to_none=[qg, kg, vg] + ([mg] if mg is not m else []))
                        for f in (interop.scaled_dot_product_attention, sdpa)]
                row += both
            rows.append((row, flops))
            print(row, flush=True)
    print("\n| shape | rel. error | fwd cusdpa TF/s | fwd PyTorch TF/s | x PyTorch |"
          + (" fwd+bwd cusdpa | fwd+bwd PyTorch | x PyTorch |" if args.backward else ""))
    print("|---|---|---|---|---|" + ("---|---|---|" if args.backward else ""))
    for row, flops in rows:
        line = f"| {row[0]} | {row[1]:.1e} | {flops / row[2] / 1e9:.1f} | {flops / row[3] / 1e9:.1f} | {row[3] / row[2]:.2f} |"
        if args.backward:
            line += f" {2.5 * flops / row[4] / 1e9:.1f} | {2.5 * flops / row[5] / 1e9:.1f} | {row[5] / row[4]:.2f} |"
        print(line)


def _calls(n: int, backward: bool, q, k, v, mask) -> None:
    if backward:
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
        dout = torch.randn_like(q)
    for _ in range(n):
        out = interop.scaled_dot_product_attention(q, k, v, mask)
        if backward:
            torch.autograd.grad(out, (q, k, v), dout)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
