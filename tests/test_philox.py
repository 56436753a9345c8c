"""Philox4x32-10 against Random123's known answers, and the dropout keep-mask's specification."""
import numpy as np
import pytest

from cusdpa import philox
from cusdpa.verify import selfcheck


@pytest.mark.parametrize("counter,key,want", selfcheck.PHILOX_KAT)
def test_known_answers(counter, key, want):
    assert tuple(int(w) for w in philox.philox4x32_10(counter, key)) == want


def test_vectorised_matches_scalar_calls(rng):
    counters = rng.integers(0, 2**32, size=(4, 50), dtype=np.uint64).astype(np.uint32)
    key = tuple(int(x) for x in rng.integers(0, 2**32, size=2))
    words = philox.philox4x32_10(tuple(counters), key)
    for n in range(0, 50, 7):
        one = philox.philox4x32_10(tuple(int(c[n]) for c in counters), key)
        assert [int(w[n]) for w in words] == [int(w) for w in one]


def test_keep_mask_follows_the_counter_layout(rng):
    """Element (bh, i, j) is word j % 4 of Philox((j // 4, i, bh, offset), (seed lo, seed hi))."""
    seed, offset, p = int(rng.integers(0, 2**64, dtype=np.uint64)), int(rng.integers(0, 2**32)), 0.37
    bh = np.array([0, 5, 1234567])
    mask = philox.keep_mask(seed, offset, bh, 9, 11, p)
    threshold = philox.keep_threshold(p)
    for n, b in enumerate(bh):
        for i, j in [(0, 0), (8, 10), (3, 4), (5, 7)]:
            words = philox.philox4x32_10((j // 4, i, int(b), offset), (seed & 0xFFFFFFFF, seed >> 32))
            assert mask[n, i, j] == (int(words[j % 4]) < threshold)


def test_keep_threshold_edges():
    assert philox.keep_threshold(0.0) == 2**32 - 1
    assert philox.keep_threshold(1.0) == 0
    assert philox.keep_threshold(0.5) == 2**31


def test_keep_fraction_is_binomial_and_seeds_differ(rng):
    p = float(rng.uniform(0.05, 0.95))
    a = philox.keep_mask(1, 0, np.arange(8), 64, 100, p)
    b = philox.keep_mask(2, 0, np.arange(8), 64, 100, p)
    c = philox.keep_mask(1, 1, np.arange(8), 64, 100, p)
    n = a.size
    sigma = np.sqrt(n * p * (1 - p))
    assert abs(a.sum() - n * (1 - p)) < 6 * sigma
    assert (a != b).mean() > 0.5 * 2 * p * (1 - p)  # independent masks disagree about 2p(1-p) of the time
    assert (a != c).mean() > 0.5 * 2 * p * (1 - p)
    np.testing.assert_array_equal(a, philox.keep_mask(1, 0, np.arange(8), 64, 100, p))
