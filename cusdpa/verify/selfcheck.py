"""A quick self-check of the reference, independent of it: Philox known answers and a per-row softmax."""
from __future__ import annotations

import numpy as np

from .. import philox, reference

# Random123's published known-answer vectors for Philox4x32-10: (counter, key) -> output words.
PHILOX_KAT = (
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
)


def _naive(q, k, v, allowed, scale):
    """One (L, E) head, row by row, with an explicit loop: the textbook definition."""
    out = np.zeros((q.shape[0], v.shape[1]))
    for i in range(q.shape[0]):
        cols = np.flatnonzero(allowed[i])
        if cols.size:
            s = scale * (k[cols] @ q[i])
            w = np.exp(s - s.max())
            out[i] = (w / w.sum()) @ v[cols]
    return out


def run(seed: int = 0) -> list[str]:
    """Return a list of failures (empty when the reference is sound)."""
    failures = []
    for counter, key, want in PHILOX_KAT:
        got = tuple(int(w) for w in philox.philox4x32_10(counter, key))
        if got != want:
            failures.append(f"Philox4x32-10{counter, key} = {[hex(w) for w in got]}, want {[hex(w) for w in want]}")
    rng = np.random.default_rng(seed)
    L, S, E, Ev = 13, 19, 8, 5
    q, k, v = rng.standard_normal((2, L, E)), rng.standard_normal((2, S, E)), rng.standard_normal((2, S, Ev))
    mask = rng.random((2, L, S)) > 0.3
    for causal, lower_right in ((False, False), (True, False), (True, True)):
        allowed = mask & reference.structural_mask(L, S, True, lower_right, (4, -1) if causal else None)
        out, _ = reference.attention(q, k, v, mask, is_causal=causal,
                                     causal_variant="lower_right" if lower_right else "upper_left",
                                     window=(4, -1) if causal else None)
        want = np.stack([_naive(q[h], k[h], v[h], allowed[h] if causal else mask[h], E**-0.5) for h in range(2)])
        err = np.abs(out - want).max()
        if not err < 1e-12:
            failures.append(f"reference vs per-row softmax (causal={causal}, lower_right={lower_right}): "
                            f"max error {err:.3g}")
    return failures
