"""``python -m cusdpa bench``: the experiments of PyTorch's SDPA tutorial and DESIGN.md's standard grid,
cusdpa and PyTorch side by side in one process. From Python: ``bench.run(bench.Options(...))``.

The bench is the one part of cusdpa that uses torch and the interop bridge (lazily, inside functions):
comparing with PyTorch is its job. ``import cusdpa`` never imports this package.
"""
from .config import PRESETS, Options
from .runner import run

__all__ = ["run", "Options", "PRESETS"]
