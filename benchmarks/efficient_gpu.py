"""EFFICIENT backend on the GPU: correctness first, then forward/backward TFLOP/s against PyTorch.

    python benchmarks/efficient_gpu.py [--reps N] [--variant auto|portable|tensor_core] [--L L] [--numba-dispatch]
                                       [--dtypes float16 bfloat16 float32] [--head-dims 64 128] [--batch B]
                                       [--hidden HQ_TIMES_E] [--mask none|bool|float] [--config sub=8 threads=8 ...]
                                       [--profile]

Shapes (issue 4): fp16 and bf16, E in {64, 128}, L = S = 4096, B = 4, Hq * E = 2048, causal and not (the
EFFICIENT issue's fp32 shape, B = 4 H = 16 L = S = 2048 E = 64: --dtypes float32 --head-dims 64 --L 2048
--hidden 1024). ``--mask`` gives both libraries the masks issue's masks, non-causal: bool (B, 1, L, S) with a
quarter of its entries False, or float (1, H, L, S) of normal values whose gradient both backwards compute.
FLOPs (docs/DESIGN.md): forward 4 * B * Hq * L * S * E, halved for causal; backward 2.5x forward.
Timing: CUDA events around each call after a warm-up, median of ``--reps`` runs, rotating among three
input sets so the 50 MB L2 does not serve repeats. PyTorch's EFFICIENT_ATTENTION backend runs in the
same process on the same inputs. ``--profile``: the GPU kernels of one forward + backward call of each library
at each point (torch.profiler), where the backward's time goes. The table comes last. A few minutes on an H100,
most of it Numba compiling the kernels (once per dtype and head dim) and PyTorch's and our backward runs.
"""
from __future__ import annotations

import argparse
import statistics


def _torch_dtype(torch, name):
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def _time(fn, inputs, reps, warmup=2):
    import torch

    for n in range(warmup):
        fn(*inputs[n % len(inputs)])
    times = []
    for n in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        args = inputs[n % len(inputs)]
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _mask(torch, kind, B, H, L, dtype):
    """The masks issue's mask of ``kind`` for a (B, H, L, L) problem, or None."""
    if kind == "bool":
        return torch.rand(B, 1, L, L, device="cuda") >= 0.25
    if kind == "float":
        return torch.randn(1, H, L, L, device="cuda", dtype=dtype)
    return None


def check(cp, mask: str = "none"):
    """EFFICIENT vs the float64 reference on a few shapes, judged by the one harness, before any timing; with
    ``mask``, two of them masked as the timed calls are."""
    import numpy as np

    from cusdpa.backends import efficient
    from cusdpa.verify.harness import Case, run_case

    rng = np.random.default_rng(0)
    failures = []
    cases = [("float16", 64, True, 300, {}), ("bfloat16", 128, False, 257, {}), ("float16", 128, True, 1, {}),
             ("float32", 64, True, 300, {})]
    if mask != "none":
        shape = (2, 1, 257, 257) if mask == "bool" else (1, 4, 257, 257)
        cases += [(dtype, E, False, 257, {"mask": mask, "mask_shape": shape})
                  for dtype, E in (("bfloat16", 64), ("float16", 128))]
    for dtype, E, causal, L, extra in cases:
        case = Case(dtype, batch=(2,), hq=4, hkv=4, L=L, S=L, E=E, causal="upper_left" if causal else None, **extra)
        failures += run_case(case, efficient.IMPL, cp, rng)
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=10, help="timed runs per config and direction")
    parser.add_argument("--variant", default="auto", choices=("auto", "portable", "tensor_core"))
    parser.add_argument("--L", type=int, default=4096)
    parser.add_argument("--numba-dispatch", action="store_true",
                        help="launch every call through Numba's dispatcher (KernelConfig.prepared_launches off)")
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"],
                        choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2048, help="Hq * E")
    parser.add_argument("--mask", default="none", choices=("none", "bool", "float"))
    parser.add_argument("--profile", action="store_true", help="the GPU kernels of one call of each library")
    parser.add_argument("--config", nargs="*", default=[], metavar="FIELD=INT",
                        help="KernelConfig's integer knobs for every call, checked before timed (threads, sub, chunk, "
                             "smem_bytes, tensor_core_blocks, tensor_core_block_n, fused_backward_head_dim; 0/1 "
                             "for tensor_core_fp32, head_major_grid)")
    args = parser.parse_args(argv)
    knobs = {name: int(value) for name, value in (item.split("=", 1) for item in args.config)}

    import cupy as cp
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import cusdpa
    import kernels_numba
    from cusdpa import Backend

    # whether Numba links the tile loops' C with link-time optimisation (its default where nvJitLink loads): then
    # the loops are inlined into their kernels; else called through the ABI, which spills far more (BENCHMARKS.md)
    from numba.cuda.cudadrv.driver import _have_nvjitlink

    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  cupy {cp.__version__}  "
          f"numba LTO {'on' if _have_nvjitlink() else 'off'}")
    cfg = kernels_numba.KernelConfig(variant=args.variant, prepared_launches=not args.numba_dispatch, **knobs)
    with kernels_numba.configured(cfg):
        failures = check(cp, args.mask)
    print("correctness: " + ("ok" if not failures else "FAILED\n  " + "\n  ".join(failures)))
    if failures:
        return 1

    B, L = args.batch, args.L
    rows = []
    for dtype in args.dtypes:
        for E in args.head_dims:
            for causal in (False, True) if args.mask == "none" else (False,):
                H = args.hidden // E
                flops = 4 * B * H * L * L * E / (2 if causal else 1)
                torch_dtype = _torch_dtype(torch, dtype)
                inputs = [[torch.randn(B, H, L, E, device="cuda", dtype=torch_dtype) for _ in range(4)]
                          + [_mask(torch, args.mask, B, H, L, torch_dtype)] for _ in range(3)]
                cu_inputs = [[None if x is None else cp.from_dlpack(x) for x in group] for group in inputs]

                def ours_fwd(q, k, v, dout, mask):
                    with kernels_numba.configured(cfg), cusdpa.sdpa_kernel([Backend.EFFICIENT]):
                        cusdpa.scaled_dot_product_attention(q, k, v, mask, is_causal=causal)

                def ours_bwd(q, k, v, dout, mask):
                    with kernels_numba.configured(cfg), cusdpa.sdpa_kernel([Backend.EFFICIENT]):
                        _, vjp = cusdpa.attention_vjp(q, k, v, mask, is_causal=causal)
                        vjp(dout)

                def torch_fwd(q, k, v, dout, mask):
                    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                        torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, is_causal=causal)

                def torch_fwd_bwd(q, k, v, dout, mask):
                    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
                    if mask is not None and mask.is_floating_point():  # its gradient, as attention_vjp computes it
                        mask = mask.detach().requires_grad_()
                    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                        torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, is_causal=causal).backward(dout)

                t_ours = _time(ours_fwd, cu_inputs, args.reps)
                t_torch = _time(torch_fwd, inputs, args.reps)
                # backward timings include their forward (vjp recomputes out and lse); subtract it
                t_ours_b = _time(ours_bwd, cu_inputs, args.reps, warmup=1) - t_ours
                t_torch_b = _time(torch_fwd_bwd, inputs, args.reps, warmup=1) - t_torch
                row = (dtype, E, causal, flops / t_ours / 1e12, flops / t_torch / 1e12,
                       2.5 * flops / t_ours_b / 1e12, 2.5 * flops / t_torch_b / 1e12)
                rows.append(row)
                if args.profile:
                    from benchmarks.bench.timing import print_kernels

                    print_kernels(f"cusdpa {dtype} E={E} causal={causal}", lambda: ours_bwd(*cu_inputs[0]), calls=1,
                                  rows=10)
                    print_kernels(f"torch {dtype} E={E} causal={causal}", lambda: torch_fwd_bwd(*inputs[0]), calls=1,
                                  rows=10)
                print(f"{dtype} E={E} causal={causal}: fwd {t_ours * 1e3:.2f} ms (torch {t_torch * 1e3:.2f}), "
                      f"bwd {t_ours_b * 1e3:.2f} ms (torch {t_torch_b * 1e3:.2f})", flush=True)
    print(f"\nEFFICIENT ({args.variant}{' ' + ' '.join(args.config) if args.config else ''}) vs torch "
          f"EFFICIENT_ATTENTION, B={B} L=S={L} Hq*E={args.hidden}, mask {args.mask}, TFLOP/s")
    print(f"{'dtype':9s} {'E':>4s} {'causal':>6s} | {'fwd':>7s} {'torch':>7s} {'ratio':>6s} | "
          f"{'bwd':>7s} {'torch':>7s} {'ratio':>6s}")
    for dtype, E, causal, f, tf, b, tb in rows:
        print(f"{dtype:9s} {E:4d} {str(causal):>6s} | {f:7.1f} {tf:7.1f} {f / tf:6.2f} | "
              f"{b:7.2f} {tb:7.1f} {b / tb:6.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
