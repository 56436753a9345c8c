"""``python -m cusdpa``: info (this machine, libraries, backends) and check (every backend against the
reference, on a fixed suite or, with --fuzz, on random cases). ``python -m cusdpa bench`` runs the
benchmark application of benchmarks/ (cusdpa/__main__.py)."""
from __future__ import annotations

import argparse
import importlib.util
import secrets
import sys

from . import dispatch, environment
from .verify import selfcheck


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


def cmd_check(args) -> int:
    from .verify import check

    if importlib.util.find_spec("torch") is None:
        print("check judges each backend against PyTorch's error at the same precision and needs torch: "
              "pip install torch (or cusdpa[test])", file=sys.stderr)
        return 2
    backends = [dispatch.Backend[name.upper()] for name in args.backends]
    note = environment.simulate_missing_gpu() if dispatch.Backend.EFFICIENT in backends else None
    seed = args.seed if args.seed is not None else secrets.randbits(32)
    print(f"cusdpa check: random inputs with seed {seed} (replay with --seed {seed})" if args.fuzz is None else
          f"cusdpa check --fuzz {args.fuzz:g}: random cases from seed {seed}; a failure prints the command that "
          "replays it")
    if note:
        print(note)
    targets = check.targets(backends)
    if args.fuzz is not None:
        return _summary(*_fuzz(targets, args.fuzz, seed))
    import numpy as np

    rng = np.random.default_rng(seed)
    return _summary([check.check_target(target, rng) for target in targets])


def _fuzz(targets, seconds: float, seed: int):
    from .verify import fuzz

    def on_failure(target, case_seed, case, failures):
        messages = " ".join("; ".join(failures).split())  # one line, whatever the messages hold
        print(f"  FAILED {target.name} {case}: {messages}; replay: {fuzz.replay(case_seed, target)}", flush=True)

    return fuzz.run(targets, seconds, seed, on_failure)


def _summary(outcomes, fuzz_cases: int | None = None) -> int:
    """A line per target (with the suite's failures; the fuzz printed its own), the verdict, the exit code."""
    for outcome in outcomes:
        if outcome.skipped:
            print(f"  {outcome.target:18s} skipped: {outcome.skipped}", flush=True)
            continue
        status = "ok" if not outcome.failed else f"FAILED ({outcome.failed} of {outcome.passed + outcome.failed})"
        print(f"  {outcome.target:18s} {status}: {outcome.passed} cases passed, "
              f"{outcome.not_supported} not supported by the backend", flush=True)
        if fuzz_cases is None:
            for failure in outcome.failures:
                print(f"      {failure}")
    passed, failed = sum(o.passed for o in outcomes), sum(o.failed for o in outcomes)
    if passed + failed == 0:
        print("check: no backend could run on this machine")
        return 1
    seeds = "" if fuzz_cases is None else f" from {fuzz_cases} case seeds"
    print(f"check: {'ok' if not failed else 'FAILED'}: {passed} cases passed, {failed} failed{seeds} "
          "(judged against the float64 reference: at most 2x PyTorch's same-precision error, 3x for gradients)")
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cusdpa", description=__doc__,
                                     epilog="python -m cusdpa bench --help: the benchmark application's options")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="GPU, library versions, each backend available or why not, reference self-check")
    check = sub.add_parser("check", help="every available backend against the reference on random inputs, "
                                         "with gradients; exits non-zero on any mismatch")
    check.add_argument("--backends", nargs="+", default=[b.name.lower() for b in dispatch.DEFAULT_PRIORITY],
                       choices=[b.name.lower() for b in dispatch.DEFAULT_PRIORITY], metavar="BACKEND",
                       help="which backends (flash, efficient, math; default: all)")
    check.add_argument("--seed", type=int, default=None,
                       help="seed of the random inputs, or with --fuzz of the first case (default: a fresh one)")
    check.add_argument("--fuzz", type=float, default=None, metavar="SECONDS",
                       help="instead of the fixed suite, draw random cases (sizes, dtypes, options, masks, layouts) "
                            "for SECONDS on every backend; each failure prints the command that replays it "
                            "(--fuzz 0 --seed S: case S alone)")
    args = parser.parse_args(argv)
    return {"info": cmd_info, "check": cmd_check}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
