"""``python -m cusdpa bench``: the experiments of PyTorch's SDPA tutorial and docs/DESIGN.md's standard grid,
cusdpa and PyTorch side by side in one process. From Python: ``bench.run(bench.Options(...))``.

It uses torch and the interop bridge (lazily, inside functions): comparing with PyTorch is its job.
No module of cusdpa imports it; ``python -m cusdpa bench`` forwards here (cusdpa/__main__.py).
"""
from .config import PRESETS, Options
from .runner import run

__all__ = ["run", "Options", "PRESETS"]
