"""The bench's results: records kept in a JSON file rewritten after each one (a crash or Ctrl-C keeps
everything measured so far), and the tables printed on screen and written as Markdown."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .config import BY_ID, PROVIDERS

ORDER = {p.id: i for i, p in enumerate(PROVIDERS)}


def _clean(x):
    """JSON has no inf/NaN: such floats become strings ("inf")."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


class Results:
    """Every measurement as one flat record (a dict with ``part`` and ``status``), in ``out/results.json``."""

    def __init__(self, out: Path, meta: dict):
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "results.json"
        self.meta, self.notes, self.records = meta, [], []
        self.write()

    def add(self, record: dict) -> None:
        self.records.append(record)
        self.write()

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.write()

    def part(self, name: str) -> list[dict]:
        return [r for r in self.records if r.get("part") == name]

    def ratios(self) -> list[dict]:
        """Part d: each cusdpa provider's TFLOP/s over each torch provider's, per point and direction."""
        ok = {}
        for r in self.part("d"):
            if r["status"] == "ok":
                ok.setdefault(_point_key(r), {})[r["provider"]] = r["tflops"]
        out = []
        for key, by in ok.items():
            for mine, t_mine in by.items():
                for theirs, t_theirs in by.items():
                    if BY_ID[mine].library == "cusdpa" and BY_ID[theirs].library == "torch":
                        out.append(dict(zip(POINT_FIELDS, key), cusdpa=mine, torch=theirs, ratio=t_mine / t_theirs))
        return out

    def write(self) -> None:
        doc = dict(self.meta, notes=self.notes, records=self.records, ratios=self.ratios())
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_clean(doc), indent=1, allow_nan=False))
        os.replace(tmp, self.path)  # atomic: the file is always a whole document


POINT_FIELDS = ("dtype", "E", "causal", "L", "direction")


def _point_key(r: dict) -> tuple:
    return tuple(r[f] for f in POINT_FIELDS)


def _value(r: dict | None, fmt) -> str:
    """``fmt(r)`` for a measurement, the status otherwise ("n/a", "skipped", "failed", "error")."""
    if r is None:
        return ""
    return fmt(r) if r["status"] == "ok" else r["status"]


def _us(r: dict | None) -> str:
    return _value(r, lambda r: f"{r['ms'] * 1e3:.1f}")


def _tflops(r: dict | None) -> str:
    return _value(r, lambda r: f"{r['tflops']:.3g}")


def _ratio(x: float) -> str:
    """A speed ratio with two decimals where that keeps two significant digits (0.98, 1.21, 12.50), else two
    significant digits (0.036, 0.0012, 3.5e-05): a small ratio never reads 0.00."""
    return f"{x:.2f}" if x >= 0.1 else f"{x:.2g}"


def _titled(title: str, caveat: str | None, table: str, reasons: list[str]) -> str:
    """A table under its title and the run's caveat (the CPU configuration's), then the reasons of its n/a's."""
    return "\n".join([title] + ([caveat] if caveat else []) + ["", table] + reasons)


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def _reasons(records: list[dict], fields) -> list[str]:
    """One line per distinct (provider, status, reason) that is not a measurement."""
    seen = {}
    for r in records:
        if r["status"] != "ok":
            where = ", ".join(f"{f}={r[f]}" for f in fields if f in r)
            seen.setdefault((r.get("provider", ""), r["status"], r.get("reason", "")), []).append(where)
    lines = []
    for (provider, status, reason), where in seen.items():
        cases = "" if not any(where) else "; ".join(where) if len(where) <= 2 else f"{len(where)} cases"
        lines.append(f"- {provider} {status}" + (f" ({cases})" if cases else "") + f": {reason}")
    return lines


def _error(r: dict) -> str:
    errors = r.get("error") or {}
    return f"{max(errors.values()):.2g}" if errors else ""


def table_a(records: list[dict], caveat: str | None = None) -> str:
    base = next((r for r in records if r["provider"] == "torch" and r["status"] == "ok"), None)
    rows = []
    for r in sorted(records, key=lambda r: ORDER[r["provider"]]):
        speed = _ratio(base["ms"] / r["ms"]) if base and r["status"] == "ok" else ""
        rows.append([r["provider"], r.get("runs_on", ""), _us(r), speed, _error(r)])
    head = records[0] if records else {}
    title = (f"(a) SDPA B={head.get('B')} H={head.get('H')} L=S={head.get('L')} E={head.get('E')} "
             f"{head.get('dtype')}, forward, microseconds; x torch: torch's default time over this one")
    return _titled(title, caveat, _markdown(["provider", "dispatch", "us", "x torch", "max error"], rows),
                   _reasons(records, ()))


def table_modules(part: str, records: list[dict], caveat: str | None = None) -> str:
    ok = {(r.get("batch"), r.get("provider"), r.get("mode")): r for r in records if r["status"] == "ok"}
    rows = []
    batches = ("dense", "nested")
    for r in sorted((r for r in records if "batch" in r),
                    key=lambda r: (batches.index(r["batch"]), ORDER[r["provider"]], r["mode"] == "compiled")):
        base = ok.get((r["batch"], "torch", r["mode"]))
        speed = _ratio(base["ms"] / r["ms"]) if base and r["status"] == "ok" else ""
        compile_s = f"{r['compile_s']:.1f}" if "compile_s" in r else ""
        rows.append([r["batch"], f"{r['sequences']}x{r['max_len']} ({r['tokens']} tokens)", r["provider"], r["mode"],
                     _us(r), speed, compile_s, _error(r)])
    title = {"b": "(b) CausalSelfAttention, dense and nested batches, inference, microseconds",
             "c": "(c) CausalSelfAttention under torch.compile, inference, microseconds"}[part]
    table = _markdown(["batch", "size", "attention", "mode", "us", "x torch", "compile s", "max error"], rows)
    return _titled(title, caveat, table, _reasons(records, ("batch", "mode")))


def table_d(records: list[dict], providers: list[str], caveat: str | None = None) -> str:
    """One row per point and direction: each provider's TFLOP/s, then the lead cusdpa provider's ratios."""
    by = {}
    for r in records:
        by.setdefault(_point_key(r), {})[r["provider"]] = r
    mine = [p for p in providers if BY_ID[p].library == "cusdpa"]
    lead = next((p for p in mine if any(row.get(p, {}).get("status") == "ok" for row in by.values())),
                mine[0] if mine else None)
    theirs = [p for p in providers if BY_ID[p].library == "torch"]
    header = ["dtype", "E", "causal", "L", "dir"] + list(providers)
    header += [f"x {t}" for t in theirs] if lead else []
    rows = []
    for key, row in by.items():
        cells = [str(k) for k in key]
        cells += [_tflops(row.get(p)) for p in providers]
        for t in theirs if lead else ():
            a, b = row.get(lead), row.get(t)
            ok = a and b and a["status"] == "ok" and b["status"] == "ok"
            cells.append(_ratio(a["tflops"] / b["tflops"]) if ok else "")
        rows.append(cells)
    head = records[0] if records else {}
    title = (f"(d) standard grid, B*L = {head.get('B', 0) * head.get('L', 0)}, H*E = {head.get('H', 0) * head.get('E', 0)}"
             ": TFLOP/s (forward 4*B*H*L*S*E, halved when causal, backward 2.5x)"
             + (f"; x torch-...: {lead}'s TFLOP/s over that torch backend's" if lead else ""))
    return _titled(title, caveat, _markdown(header, rows), _reasons(records, POINT_FIELDS))


def tables(results: Results, parts, providers_d: list[str]) -> str:
    """The tables of ``parts`` that have records, in order; part d's columns are ``providers_d``. Each title
    carries the run's caveat, where it has one (the CPU configuration's)."""
    caveat = results.meta.get("caveat")
    out = []
    for part in parts:
        records = results.part(part)
        if not records:
            continue
        if part == "a":
            out.append(table_a(records, caveat))
        elif part == "d":
            out.append(table_d(records, providers_d, caveat))
        else:
            out.append(table_modules(part, records, caveat))
    return "\n\n".join(out)
