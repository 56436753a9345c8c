"""PNG plots of the bench's results (matplotlib's Agg backend: no display needed).

grid_<dtype>.png: part d, TFLOP/s against sequence length per provider, one panel per head dim,
causal flag and direction. tutorial.png: parts a to c, microseconds per provider. Values spanning more
than SPAN (a factor) go on a log axis, so the slowest provider is not flattened onto zero; a run's caveat
(the CPU configuration's) is part of every figure's title.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

from .config import BY_ID

SPAN = 50


def _log_if_wide(values, set_scale) -> None:
    positive = [v for v in values if v > 0]
    if positive and max(positive) > SPAN * min(positive):
        set_scale("log")


def _title(fig, title: str, caveat: str | None) -> None:
    if caveat:
        fig.suptitle("\n".join([title] + textwrap.wrap(caveat, 100)), fontsize=11)
    else:
        fig.suptitle(title)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _style(provider: str) -> dict:
    # cusdpa solid with filled markers, torch dashed with open ones; one colour per backend kind
    p = BY_ID[provider]
    kind = (p.backend or "default").split("_")[0]
    colour = {"FLASH": "C0", "EFFICIENT": "C1", "CUDNN": "C2", "MATH": "C3", "default": "C4"}[kind]
    if p.library == "cusdpa":
        return dict(color=colour, linestyle="-", marker="o")
    return dict(color=colour, linestyle="--", marker="s", markerfacecolor="none")


def grid(records: list[dict], out: Path, caveat: str | None = None) -> list[Path]:
    """One figure per dtype; rows are directions, columns (head dim, causal)."""
    plt = _pyplot()
    written = []
    for dtype in dict.fromkeys(r["dtype"] for r in records):
        mine = [r for r in records if r["dtype"] == dtype]
        directions = list(dict.fromkeys(r["direction"] for r in mine))
        columns = list(dict.fromkeys((r["E"], r["causal"]) for r in mine))
        fig, axes = plt.subplots(len(directions), len(columns), figsize=(4.2 * len(columns), 3.4 * len(directions)),
                                 squeeze=False, constrained_layout=True)
        for i, direction in enumerate(directions):
            for j, (E, causal) in enumerate(columns):
                ax = axes[i][j]
                panel = [r for r in mine if r["direction"] == direction and r["E"] == E and r["causal"] == causal]
                for provider in dict.fromkeys(r["provider"] for r in panel):
                    points = sorted((r["L"], r["tflops"]) for r in panel
                                    if r["provider"] == provider and r["status"] == "ok")
                    if points:
                        ax.plot(*zip(*points), label=BY_ID[provider].label, **_style(provider))
                ax.set_xscale("log", base=2)
                _log_if_wide([r["tflops"] for r in panel if r["status"] == "ok"], ax.set_yscale)
                ax.set_title(f"E={E}, {'causal' if causal else 'not causal'}, {direction}", fontsize=10)
                ax.set_xlabel("sequence length L = S")
                ax.set_ylabel("TFLOP/s")
                ax.grid(alpha=0.3)
        handles = {}
        for ax in axes.flat:
            handles.update(zip(*reversed(ax.get_legend_handles_labels())))
        fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncol=min(len(handles), 4) or 1,
                   fontsize=9)
        _title(fig, f"attention {dtype}: cusdpa (solid) and PyTorch (dashed)", caveat)
        path = out / f"grid_{dtype}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def tutorial(parts: dict, out: Path, caveat: str | None = None) -> Path | None:
    """Bars of microseconds, one panel per part among a, b, c that has measurements."""
    panels = {name: [r for r in records if r["status"] == "ok"] for name, records in parts.items()}
    panels = {name: records for name, records in panels.items() if records}
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False, constrained_layout=True)
    titles = {"a": "(a) SDPA call", "b": "(b) CausalSelfAttention", "c": "(c) torch.compile"}
    for ax, (name, records) in zip(axes[0], panels.items()):
        if name == "a":
            labels = [r["label"] for r in records]
        else:
            labels = [f"{r['provider']} {r['batch'] if name == 'b' else r['mode']}" for r in records]
        colours = ["C0" if r["provider"].startswith("cusdpa") else "C7" for r in records]
        us = [r["ms"] * 1e3 for r in records]
        ax.barh(labels, us, color=colours)
        _log_if_wide(us, ax.set_xscale)
        ax.invert_yaxis()
        ax.set_xlabel("microseconds (lower is better)")
        ax.set_title(titles[name], fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    _title(fig, "cusdpa (blue) and PyTorch (grey)", caveat)
    path = out / "tutorial.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
