"""``python -m cusdpa``: info (this machine, libraries, backends), check (every backend against the
reference) and bench (cusdpa and PyTorch side by side, the experiments of PyTorch's SDPA tutorial)."""
from __future__ import annotations

import argparse
import importlib.util
import os
import secrets
import sys

from . import dispatch, environment, selfcheck


def cmd_info(args) -> int:
    print("cusdpa info")
    gpus = environment.gpus()
    print("GPU: " + ("\n     ".join(gpus) if gpus else f"none ({environment.cupy_problem()})"))
    print("libraries:")
    for name, version in environment.versions().items():
        print(f"  {name:14s} {version}")
    print(f"Numba CUDA simulator: {'on' if environment.simulator_enabled() else 'off'} (NUMBA_ENABLE_CUDASIM)")
    print("backends (priority order):")
    for b in dispatch.DEFAULT_PRIORITY:
        impl = dispatch.implementation(b)
        reasons = impl.environment_reasons(None)
        caps = impl.capabilities
        status = "available" if not reasons else "not available: " + "; ".join(reasons)
        print(f"  {b.name:9s} {status}")
        print(f"  {'':9s} takes {'/'.join(sorted(caps.arrays))} arrays, dtypes {'/'.join(sorted(caps.dtypes))}, "
              f"masks {'/'.join(sorted(caps.mask_kinds)) or 'none'}")
    failures = selfcheck.run()
    print("reference self-check: " + ("ok" if not failures else "FAILED\n  " + "\n  ".join(failures)))
    return 1 if failures else 0


def simulate_missing_gpu() -> str | None:
    """Without a usable GPU, switch Numba to its CUDA simulator so that EFFICIENT runs on the CPU.

    Numba reads NUMBA_ENABLE_CUDASIM once, when numba.cuda is first imported, so this only works
    before that; returns a note for the user when it switched.
    """
    if environment.simulator_enabled() or environment.cupy_problem() is None or "numba" in sys.modules:
        return None
    if importlib.util.find_spec("numba") is None:
        return None
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    return "no usable CUDA GPU: EFFICIENT runs on Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1), tiny sizes only"


def cmd_check(args) -> int:
    from . import check

    if importlib.util.find_spec("torch") is None:
        print("check judges each backend against PyTorch's error at the same precision and needs torch: "
              "pip install torch (or cusdpa[test])", file=sys.stderr)
        return 2
    backends = [dispatch.Backend[name.upper()] for name in args.backends]
    note = simulate_missing_gpu() if dispatch.Backend.EFFICIENT in backends else None
    seed = args.seed if args.seed is not None else secrets.randbits(32)
    print(f"cusdpa check: random inputs with seed {seed} (replay with --seed {seed})")
    if note:
        print(note)
    import numpy as np

    rng = np.random.default_rng(seed)
    passed = failed = 0
    for backend, xp_name in check.targets(backends):
        outcome = check.check_target(backend, xp_name, rng)
        if outcome.skipped:
            print(f"  {outcome.target:18s} skipped: {outcome.skipped}", flush=True)
            continue
        status = "ok" if not outcome.failed else f"FAILED ({outcome.failed} of {outcome.passed + outcome.failed})"
        print(f"  {outcome.target:18s} {status}: {outcome.passed} cases passed, "
              f"{outcome.not_supported} not supported by the backend", flush=True)
        for failure in outcome.failures:
            print(f"      {failure}")
        passed += outcome.passed
        failed += outcome.failed
    if passed + failed == 0:
        print("check: no backend could run on this machine")
        return 1
    print(f"check: {'ok' if not failed else 'FAILED'}: {passed} cases passed, {failed} failed "
          "(judged against the float64 reference: at most 2x PyTorch's same-precision error, 3x for gradients)")
    return 1 if failed else 0


def cmd_bench(args) -> int:
    import dataclasses
    from pathlib import Path

    from .bench import config

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
    note = simulate_missing_gpu() if opts.providers is None or "cusdpa-efficient" in opts.providers else None
    print(f"cusdpa bench: parts {', '.join(opts.parts)}, sizes '{preset}'" + (f"; {note}" if note else ""))
    from .bench import runner

    try:
        return runner.run(opts, argv=args.argv)
    except config.SetupError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2


def _bench_parser(sub) -> None:
    from .bench import config

    p = sub.add_parser("bench", help="cusdpa and PyTorch side by side: the SDPA tutorial's experiments and the "
                                     "standard grid; table, JSON and PNG plots in --out",
                       description="cusdpa and PyTorch side by side in one process: the experiments of PyTorch's "
                                   "SDPA tutorial (parts a-c) and DESIGN.md's standard grid (part d). Every result "
                                   "is checked against the float64 reference before it is timed. Writes "
                                   "results.json (after every measurement), tables.md, grid_<dtype>.png and "
                                   "tutorial.png to --out. Without a CUDA GPU it runs the tiny CPU configuration.")
    p.add_argument("--parts", nargs="+", default=list(config.PARTS), choices=list(config.PARTS),
                   help="; ".join(f"{k}: {v}" for k, v in config.PARTS.items()))
    sizes = p.add_mutually_exclusive_group()
    sizes.add_argument("--preset", choices=list(config.PRESETS), default=None,
                       help="sizes: full (the tutorial's and DESIGN.md's; default on a GPU), quick (every part, "
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cusdpa", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="GPU, library versions, each backend available or why not, reference self-check")
    check = sub.add_parser("check", help="every available backend against the reference on random inputs, "
                                         "with gradients; exits non-zero on any mismatch")
    check.add_argument("--backends", nargs="+", default=[b.name.lower() for b in dispatch.DEFAULT_PRIORITY],
                       choices=[b.name.lower() for b in dispatch.DEFAULT_PRIORITY], metavar="BACKEND",
                       help="which backends (flash, efficient, math; default: all)")
    check.add_argument("--seed", type=int, default=None, help="seed of the random inputs (default: a fresh one)")
    _bench_parser(sub)
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # recorded with the results
    return {"info": cmd_info, "check": cmd_check, "bench": cmd_bench}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
