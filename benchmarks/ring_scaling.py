"""Ring attention's scaling: forward + backward of interop.ring_attention over W ranks at a fixed length per
rank, against one rank at that length; per GPU, TFLOP/s (the causal attention's products, 2 x 2 x B H L^2 E
/ 2 forward, 2.5x that forward + backward, divided by W) and tokens/s (L / time / W).

    python benchmarks/ring_scaling.py --world 1 2 4 --per-rank 131072 262144   # GPUs (NCCL), bf16
    python benchmarks/ring_scaling.py --device cpu --world 1 2 --per-rank 64   # a smoke run (gloo)

Each world size runs in its own processes (torch.multiprocessing, one per GPU); times are medians of
``--repeat`` calls after one warm-up, CUDA events on every rank, the slowest rank's (the ring waits for it).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank(rank: int, world: int, store: str, args, results):
    import interop

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=store, rank=rank, world_size=world)
    try:
        device = torch.device(f"cuda:{rank}" if cuda else "cpu")
        dtype = torch.bfloat16 if cuda else torch.float32
        for per_rank in args.per_rank:
            shape = (1, args.heads, per_rank, args.dim)
            q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
            dout = torch.randn(shape, device=device, dtype=dtype)

            def step():
                out = interop.ring_attention(q, k, v, is_causal=True, layout="zigzag" if world > 1 else "contiguous")
                out.backward(dout)
                q.grad = k.grad = v.grad = None

            step()  # warm: kernels compiled, plans made
            times = []
            for _ in range(args.repeat):
                if cuda:
                    torch.cuda.synchronize(device)
                dist.barrier()
                start = time.perf_counter()
                step()
                if cuda:
                    torch.cuda.synchronize(device)
                elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64,
                                       device=device if cuda else "cpu")
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the ring runs at its slowest rank's pace
                times.append(elapsed.item())
            if rank == 0:
                results[(world, per_rank)] = statistics.median(times)
    finally:
        dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--world", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--per-rank", type=int, nargs="+", default=[131072])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    if args.device == "cuda" and max(args.world) > torch.cuda.device_count():
        ap.error(f"--world {max(args.world)} needs that many GPUs; {torch.cuda.device_count()} visible")
    results = mp.Manager().dict()
    for world in args.world:
        store = f"file://{tempfile.mkdtemp()}/rendezvous"
        mp.spawn(_rank, args=(world, store, args, results), nprocs=world, join=True)
    print("| ranks | length per rank | total length | ms (fwd+bwd) | TFLOP/s per rank | tokens/s per rank | "
          "x one rank |")
    print("|---|---|---|---|---|---|---|")
    for per_rank in args.per_rank:
        base = None
        for world in args.world:
            seconds = results[(world, per_rank)]
            L = world * per_rank
            flops = 2.5 * 2 * args.heads * L * L * args.dim  # causal: half of 4 H L^2 E, forward + backward
            per_rank_tflops = flops / seconds / world / 1e12
            base = base or per_rank_tflops
            print(f"| {world} | {per_rank} | {L} | {1e3 * seconds:.1f} | {per_rank_tflops:.1f} | "
                  f"{L / seconds / world:.0f} | {per_rank_tflops / base:.2f} |")


if __name__ == "__main__":
    main()
