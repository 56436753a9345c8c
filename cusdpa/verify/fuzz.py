"""``python -m cusdpa check --fuzz SECONDS``: seeded random cases on every target, for a while.

Case seeds form a chain from ``--seed``: the first case uses the seed itself, each next one a seed
drawn from the one before (``next_seed``). A case seed and a target determine the case (``draw``:
fitted to what the target's backend takes, sized for where it runs) and all its values, so
``python -m cusdpa check --fuzz 0 --seed S --backends B`` runs that one case again (at least one case
always runs). Each case is judged as ``check`` judges its suite (harness.run_problem).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .check import Outcome, Target
from .harness import Case

FLOAT_DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class Sizes:
    length: int  # largest L and S, and largest sequence of a packed batch
    head_dim: int  # largest E and Ev
    heads: int  # largest Hkv and largest GQA group
    batch: int  # largest size of each of at most two batch dims


# Numba's simulator runs each GPU thread as a Python thread: a few tiles of 4-8 rows. NumPy's MATH: a
# few milliseconds a case. A GPU: several 64-128-row tiles of FLASH and EFFICIENT, in every direction.
SIZES = {"simulator": Sizes(length=8, head_dim=8, heads=2, batch=1),
         "host": Sizes(length=48, head_dim=40, heads=2, batch=2),
         "device": Sizes(length=700, head_dim=256, heads=3, batch=2)}


def next_seed(seed: int) -> int:
    """The case seed after ``seed``."""
    return int(np.random.default_rng([seed, 1]).integers(2**32))


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def draw(rng, target: Target) -> Case:
    """A random case for ``target``: odd sizes (sometimes empty), dtypes, E != Ev, GQA, causal in both
    alignments, windows, dropout with any seed and offset, packed varlen batches, masks of any broadcast
    shape (and float dtype) where the backend takes them, given as arrays or BlockMasks, broadcast and
    transposed inputs."""
    caps = target.impl.capabilities
    size = SIZES["simulator" if target.simulator else "host" if target.xp_name == "numpy" else "device"]

    def length():
        return 0 if rng.random() < 0.05 else int(rng.integers(1, size.length + 1))

    def head_dim():
        step = caps.head_dim_multiple
        return step * int(rng.integers(1, size.head_dim // step + 1))

    dtypes = [d for d in FLOAT_DTYPES if d in caps.dtypes]
    E = head_dim()
    hkv = int(rng.integers(1, size.heads + 1))
    common = dict(dtype=_pick(rng, dtypes), E=E, Ev=head_dim() if rng.random() < 0.3 else None, hkv=hkv,
                  hq=hkv * (int(rng.integers(1, size.heads + 1)) if caps.gqa else 1),
                  causal=_pick(rng, [None, "upper_left"] + (["lower_right"] if caps.lower_right else [])))
    if caps.window and rng.random() < 0.3:
        common["window"] = (int(rng.integers(-1, size.length)), int(rng.integers(-1, size.length)))
    if caps.dropout and rng.random() < 0.3:
        common.update(dropout_p=_pick(rng, [0.1, 0.3, 0.6]), seed=int(rng.integers(2**63)),
                      offset=int(rng.integers(2**32)))
    if caps.varlen and rng.random() < 0.2:
        return Case(**common, varlen=tuple((length(), length()) for _ in range(int(rng.integers(1, 4)))))
    batch = tuple(int(rng.integers(1, size.batch + 1)) for _ in range(int(rng.integers(0, 3))))
    L, S = length(), length()
    mask = {}
    if caps.mask_kinds and rng.random() < 0.3:
        full = batch + (common["hq"], L, S)
        rank = int(rng.integers(1, len(full) + 1))
        mask = dict(mask=_pick(rng, sorted(caps.mask_kinds)),
                    mask_shape=tuple(n if rng.random() < 0.6 else 1 for n in full[-rank:]))
        if mask["mask"] == "float":
            mask["mask_dtype"] = _pick(rng, dtypes)
    kv_batch_broadcast, transposed = bool(batch) and rng.random() < 0.2, rng.random() < 0.3
    if mask:
        mask["block_mask"] = rng.random() < 0.5
    return Case(**common, **mask, batch=batch, L=L, S=S, kv_batch_broadcast=kv_batch_broadcast, transposed=transposed)


def replay(seed: int, target: Target) -> str:
    return f"python -m cusdpa check --fuzz 0 --seed {seed} --backends {target.backend.name.lower()}"


def run(targets: list[Target], seconds: float, seed: int, on_failure) -> tuple[list[Outcome], int]:
    """Draw and run cases on every available target until ``seconds`` have passed (at least one case);
    ``on_failure(target, seed, case, failures)`` hears of each failed one as it happens. Returns the
    outcome of each target and the number of case seeds run."""
    outcomes = [Outcome(t.name, skipped=t.unavailable()) for t in targets]
    live = [(t, o) for t, o in zip(targets, outcomes) if not o.skipped]
    deadline = time.monotonic() + seconds
    cases = 0
    while live:
        for target, outcome in live:
            rng = np.random.default_rng(seed)  # the case and its values depend on the seed and target only
            case = draw(rng, target)
            with target.running():
                failures = outcome.run(target, case, rng)
            if failures:
                on_failure(target, seed, case, failures)
        cases += 1
        if time.monotonic() >= deadline:
            break
        seed = next_seed(seed)
    return outcomes, cases
