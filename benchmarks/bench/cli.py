"""``python -m cusdpa bench`` (or ``python -m benchmarks.bench``): cusdpa and PyTorch side by side in one
process, the experiments of PyTorch's SDPA tutorial and the standard grid."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from cusdpa import environment

from . import config


def cmd_bench(args) -> int:
    no_gpu = environment.cupy_problem()
    preset = args.preset or ("quick" if args.quick else "tiny" if no_gpu else "full")
    if no_gpu and preset != "tiny":
        print(f"bench: the '{preset}' sizes need a CUDA GPU ({no_gpu}); without one run the default tiny CPU "
              "configuration (leave out --preset/--quick; --lengths etc. still select)", file=sys.stderr)
        return 2
    sizes = dataclasses.replace(config.PRESETS[preset], **{
        name: tuple(value) if isinstance(value, list) else value
        for name in ("dtypes", "lengths", "head_dims", "tokens", "hidden", "warmup_ms", "rep_ms")
        if (value := getattr(args, name)) is not None})
    opts = config.Options(parts=tuple(args.parts), sizes=sizes, providers=args.providers and tuple(args.providers),
                          causal={"both": (False, True), "causal": (True,), "noncausal": (False,)}[args.causal],
                          directions=tuple(args.directions), out=Path(args.out), seed=args.seed,
                          efficient_bwd_max_len=args.efficient_bwd_max_len, math_max_len=args.math_max_len,
                          compile_backend=args.compile_backend)
    # before anything imports numba: EFFICIENT on the CPU is the simulator
    note = environment.simulate_missing_gpu() if opts.providers is None or "cusdpa-efficient" in opts.providers else None
    print(f"cusdpa bench: parts {', '.join(opts.parts)}, sizes '{preset}'" + (f"; {note}" if note else ""))
    from . import runner

    try:
        return runner.run(opts, argv=args.argv)
    except config.SetupError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cusdpa bench",
                                description="cusdpa and PyTorch side by side in one process: the experiments of PyTorch's "
                                   "SDPA tutorial (parts a-c) and docs/DESIGN.md's standard grid (part d). Every result "
                                   "is checked against the float64 reference before it is timed. Writes "
                                   "results.json (after every measurement), tables.md, grid_<dtype>.png and "
                                   "tutorial.png to --out. Without a CUDA GPU it runs the tiny CPU configuration.")
    p.add_argument("--parts", nargs="+", default=list(config.PARTS), choices=list(config.PARTS),
                   help="; ".join(f"{k}: {v}" for k, v in config.PARTS.items()))
    sizes = p.add_mutually_exclusive_group()
    sizes.add_argument("--preset", choices=list(config.PRESETS), default=None,
                       help="sizes: full (the tutorial's and docs/DESIGN.md's; default on a GPU), quick (every part, "
                            "smaller grid, shorter timing), tiny (the CPU configuration; default without a GPU)")
    sizes.add_argument("--quick", action="store_true", help="same as --preset quick")
    p.add_argument("--providers", nargs="+", choices=list(config.BY_ID), default=None, metavar="PROVIDER",
                   help=f"which of {', '.join(config.BY_ID)} (default: all in part a, every backend in part d)")
    p.add_argument("--dtypes", nargs="+", choices=["bfloat16", "float16"], default=None, help="part d dtypes")
    p.add_argument("--lengths", nargs="+", type=int, default=None, help="part d sequence lengths L = S")
    p.add_argument("--head-dims", nargs="+", type=int, default=None, help="part d head dims E")
    p.add_argument("--tokens", type=int, default=None, help="part d B * L (full preset: 16384)")
    p.add_argument("--hidden", type=int, default=None, help="part d H * E (full preset: 2048)")
    p.add_argument("--causal", choices=["both", "causal", "noncausal"], default="both", help="part d")
    p.add_argument("--directions", nargs="+", choices=["fwd", "bwd"], default=["fwd", "bwd"], help="part d")
    p.add_argument("--warmup-ms", type=float, default=None, help="warm-up time per measurement")
    p.add_argument("--rep-ms", type=float, default=None, help="repetition time per measurement")
    p.add_argument("--efficient-bwd-max-len", type=int, default=config.Options.efficient_bwd_max_len,
                   help="time cusdpa EFFICIENT's backward only up to this L (its fp32 kernels are slow beyond)")
    p.add_argument("--math-max-len", type=int, default=config.Options.math_max_len,
                   help="time the unfused MATH backends only up to this L (they hold every L x S score)")
    p.add_argument("--compile-backend", default=config.Options.compile_backend, help="part c: torch.compile backend")
    p.add_argument("--out", default=str(config.Options.out), help="output folder (default: bench-results)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    return p


def main(argv=None) -> int:
    argv = list(argv) if argv is not None else sys.argv[1:]
    args = parser().parse_args(argv)
    args.argv = ["bench"] + argv  # recorded with the results
    return cmd_bench(args)


if __name__ == "__main__":
    sys.exit(main())
