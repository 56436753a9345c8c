"""``python -m cusdpa bench``: the parts in order, a progress bar, and the results as a table on screen,
results.json, tables.md and PNG plots in the output folder."""
from __future__ import annotations

import datetime
import sys
import time
import traceback

from cusdpa import environment
from . import modules, plots, report, sdpa
from .config import PARTS, Options, SetupError
from .device import Device

PROTOCOL = [
    "each provider is checked against the float64 reference (cusdpa.reference) on the very inputs it is timed on, "
    "before any timing: error at most 2x PyTorch's same-precision error (3x for gradients) plus a floor of one "
    "unit of roundoff of the dtype times max|reference|; a provider that errs more is 'failed' and not timed",
    "GPU times are medians of CUDA-event timings after warm-up with the L2 cache flushed before each run "
    "(triton.testing.do_bench where triton is installed); calls too slow for 5 runs in the budget get 3 runs",
    "FLOPs: forward 4*B*H*L*S*E, halved for causal with L == S; backward 2.5x forward; backward times exclude "
    "the forward",
]


def _units(opts: Options) -> int:
    """Measurements the progress bar counts."""
    n = 0
    for part in opts.parts:
        if part == "a":
            n += len(opts.providers_for("a"))
        elif part == "d":
            n += len(sdpa.grid_points(opts)) * len(opts.providers_for("d")) * len(opts.directions)
        else:
            n += 4
    return n


def _requirements():
    """tqdm's progress bar class; both it and matplotlib are checked before minutes of work, not after."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise SetupError("bench writes PNG plots with matplotlib: pip install matplotlib (or cusdpa[bench])") from e
    try:
        from tqdm import tqdm
    except ImportError as e:
        raise SetupError("bench shows its progress with tqdm: pip install tqdm (or cusdpa[bench])") from e
    return tqdm


def _meta(opts: Options, dev: Device, where: str, argv) -> dict:
    started = datetime.datetime.now().isoformat(timespec="seconds")
    meta = dict(command="python -m cusdpa " + " ".join(argv), started=started, machine=where, gpus=environment.gpus(),
                versions=environment.versions(), options=opts.as_dict(), protocol=PROTOCOL)
    if dev.caveat:
        meta["caveat"] = dev.caveat
    return meta


def _skip_notes(opts: Options) -> list[str]:
    """What part d leaves out by default, said once up front."""
    if "d" not in opts.parts:
        return []
    ids = [p.id for p in opts.providers_for("d")]
    longest = max(opts.sizes.lengths)
    notes = []
    if "cusdpa-efficient" in ids and "bwd" in opts.directions and longest > opts.efficient_bwd_max_len:
        notes.append(f"cusdpa EFFICIENT's backward is timed only up to L = {opts.efficient_bwd_max_len}: its fp32 "
                     "kernels are slow on longer sequences (--efficient-bwd-max-len)")
    if any(p.endswith("-math") for p in ids) and longest > opts.math_max_len:
        notes.append(f"the unfused MATH backends are timed only up to L = {opts.math_max_len}: they hold every "
                     "L x S score (--math-max-len)")
    return notes


def run(opts: Options, argv=()) -> int:
    """Run the selected parts; 0 when every cusdpa result passed its check, 1 otherwise."""
    tqdm = _requirements()
    dev, where = Device.detect(opts.sizes)
    print(where)
    results = report.Results(opts.out, _meta(opts, dev, where, argv))
    providers_d = [p.id for p in opts.providers_for("d")]
    for note in _skip_notes(opts):
        results.note(note)
        print(f"note: {note}")
    bar = tqdm(total=_units(opts), unit="run", dynamic_ncols=True, file=sys.stderr)
    progress = bar.update
    try:
        for part in opts.parts:
            bar.set_description(f"part {part}")
            start = time.perf_counter()
            try:
                if part == "a":
                    sdpa.measure("a", sdpa.tutorial_point(opts), opts.providers_for("a"), ("fwd",), opts, dev,
                                 results, opts.seed, progress)
                elif part == "d":
                    for i, point in enumerate(sdpa.grid_points(opts)):
                        bar.set_description(f"part d {point.dtype} E={point.E} L={point.L}"
                                            f"{' causal' if point.causal else ''}")
                        sdpa.measure("d", point, opts.providers_for("d"), opts.directions, opts, dev, results,
                                     opts.seed + 1 + i, progress)
                else:
                    modules.measure(part, opts, dev, results, progress)
            except Exception as e:  # a broken part is reported; the others still run
                results.note(f"part {part} stopped: {type(e).__name__}: {e}")
                bar.write(f"part {part} stopped:\n{traceback.format_exc()}")
                dev.free()
            # wall time of the part, compilation included: what a run costs on a lent machine
            results.meta.setdefault("part_seconds", {})[part] = round(time.perf_counter() - start, 1)
            results.write()
            bar.write("\n" + report.tables(results, [part], providers_d)
                      + f"\n\npart {part} took {time.perf_counter() - start:.0f} s\n")
    finally:
        bar.close()
        _finish(results, opts, providers_d)
    wrong = [r for r in results.records if r["status"] == "failed" and r.get("provider", "").startswith("cusdpa")]
    return 1 if wrong else 0


def _finish(results: report.Results, opts: Options, providers_d: list[str]) -> None:
    """tables.md and the plots, from whatever was measured."""
    results.meta["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    results.write()
    m = results.meta
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v != "not installed")
    head = f"`{m['command']}`, {m['started']} to {m['finished']}\n\n{m['machine']}\n\n{versions}"
    head = f"**{m['caveat']}**\n\n{head}" if m.get("caveat") else head
    notes = "".join(f"\n- {n}" for n in results.notes)
    text = report.tables(results, list(PARTS), providers_d)
    (opts.out / "tables.md").write_text(f"{head}\n\n{text}\n" + (f"\nNotes:{notes}\n" if notes else ""))
    caveat = m.get("caveat")
    written = plots.grid(results.part("d"), opts.out, caveat) if results.part("d") else []
    bars = plots.tutorial({p: results.part(p) for p in "abc"}, opts.out, caveat)
    written += [bars] if bars else []
    print(f"\nresults: {results.path}, {opts.out / 'tables.md'}" + "".join(f", {p}" for p in written))
    for n in results.notes:
        print(f"note: {n}")
