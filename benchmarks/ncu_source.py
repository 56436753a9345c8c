"""Where a kernel's warps wait, per SASS line: a summary of ncu's source page.

    ncu --clock-control none -k regex:KERNEL -c 1 --section WarpStateStats --section SourceCounters \
        --page source --print-source sass --csv python3 ... > profile.csv
    python benchmarks/ncu_source.py profile.csv [--top 30]

Prints the stall reasons over all samples, then the SASS lines with the most warp-state samples, each with
its share, how often it ran and its main stall reasons. A line's samples are its warps' waits *at* it:
a barrier wait shows on the instruction after the barrier, a scoreboard wait on the first instruction
that reads the awaited register. Lines run once per warp and loop trip show their role by their count
(a producer or order warp runs a step's line once, each of 8 consumer warps once more).
"""
from __future__ import annotations

import argparse
import csv
import io

SAMPLES = "Warp Stall Sampling (All Samples)"


def read(path: str) -> list[dict]:
    """The rows of the source table in ``path`` (ncu's log lines before it are skipped)."""
    lines = open(path, errors="replace").read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('"Address","Source"'))
    return list(csv.DictReader(io.StringIO("\n".join(lines[start:]))))


def number(text: str) -> float:
    return float(text.replace(",", "")) if text else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", help="ncu --page source --print-source sass --csv output")
    ap.add_argument("--top", type=int, default=30, help="SASS lines to list")
    args = ap.parse_args()
    rows = read(args.csv)
    reasons = [k for k in rows[0] if k.startswith("stall_") and "Not Issued" not in k]
    total = sum(number(r[SAMPLES]) for r in rows) or 1.0
    by_reason = sorted(((sum(number(r[k]) for r in rows), k[6:]) for k in reasons), reverse=True)
    print(f"{total:.0f} samples: " + ", ".join(f"{name} {n / total:.1%}" for n, name in by_reason if n / total >= 0.005))
    for r in sorted(rows, key=lambda r: -number(r[SAMPLES]))[:args.top]:
        s = number(r[SAMPLES])
        main_reasons = sorted(((number(r[k]), k[6:]) for k in reasons), reverse=True)
        why = " ".join(f"{name}={n / s:.0%}" for n, name in main_reasons if s and n >= 0.1 * s)
        print(f"{r['Address'][-5:]:>6} {s / total:6.1%} {number(r['Instructions Executed']):>9.0f}  "
              f"{r['Source'].strip()[:64]:64s} {why}")


if __name__ == "__main__":
    main()
