"""``python -m cusdpa``: the library's commands (cusdpa.cli: info, check) and ``bench``, the benchmark
application in the repository's benchmarks/ folder. This program composes the two; no module of the
library imports the application (which imports cusdpa and interop)."""
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        from benchmarks.bench.cli import main as bench

        return bench(argv[1:])
    from .cli import main as commands

    return commands(argv)


if __name__ == "__main__":
    sys.exit(main())
