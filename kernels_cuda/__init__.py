"""CUDA C++ sources of cusdpa's kernels, compiled at run time by NVRTC: the FLASH kernels (through CuPy)
and the tile loops (forward and backward, efficient_*.cuh) that the EFFICIENT backend links into its Numba
kernels, all built on one header of tensor-core helpers, Philox and visibility (``common.cuh``, which
includes nothing, so the Numba-linked sources compile wherever Numba finds NVRTC, CUDA headers or not). The FLASH kernels add
``flash_common.cuh``: the element type from <cuda_fp16.h>/<cuda_bf16.h>, shared-memory tile loads and
products, and the prologue that maps a CTA to its (batch, head) slice.

This package holds source text only; it imports nothing. ``source(name)`` returns a file with its
local includes inlined, so no compiler needs an include path and a compile cache keys on the whole
text.
"""
from __future__ import annotations

import re
from pathlib import Path

DIR = Path(__file__).parent
_INCLUDE = re.compile(r'^#include "([\w.]+)"[ \t]*$', re.MULTILINE)


def source(name: str) -> str:
    """The text of ``name`` (a file of this folder) with each local ``#include "file"`` replaced by that
    file's text, the first time it appears (every header here is ``#pragma once``)."""
    seen: set[str] = set()

    def inline(match: re.Match) -> str:
        included = match.group(1)
        if included in seen:
            return ""
        seen.add(included)
        return _INCLUDE.sub(inline, (DIR / included).read_text())

    seen.add(name)
    return _INCLUDE.sub(inline, (DIR / name).read_text())
