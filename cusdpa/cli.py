"""``python -m cusdpa``: info (this machine, libraries, backends)."""
from __future__ import annotations

import argparse
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cusdpa", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="GPU, library versions, each backend available or why not, reference self-check")
    args = parser.parse_args(argv)
    return {"info": cmd_info}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
