"""Masks made once: cusdpa.BlockMask for NumPy and CuPy callers (every backend reads its array as the array
itself), and the torch ops' summary keeping (interop.mask_summaries), whose keys are checked here on CPU
tensors; the GPU tests (tests/test_flash.py, tests/test_interop_gpu.py) check that kept summaries serve."""
import gc

import numpy as np
import pytest

import cusdpa


def _inputs(rng, kind):
    q, k, v = (rng.standard_normal((2, 3, n, 16)).astype(np.float32) for n in (9, 12, 12))
    keep = rng.random((2, 1, 9, 12)) < 0.6
    keep[..., 0] = True
    mask = keep if kind == "bool" else np.where(keep, rng.standard_normal(keep.shape), -np.inf).astype(np.float32)
    return q, k, v, mask


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_a_block_mask_gives_what_its_array_gives(rng, kind):
    q, k, v, mask = _inputs(rng, kind)
    wrapped = cusdpa.BlockMask(mask)
    assert wrapped.shape == mask.shape and wrapped.dtype == mask.dtype and cusdpa.BlockMask(wrapped).mask is mask
    for causal in (False, True):
        want = cusdpa.scaled_dot_product_attention(q, k, v, mask, is_causal=causal)
        np.testing.assert_array_equal(cusdpa.scaled_dot_product_attention(q, k, v, wrapped, is_causal=causal), want)
    dout = rng.standard_normal(want.shape).astype(np.float32)
    want = cusdpa.attention_vjp(q, k, v, mask)[1](dout)
    got = cusdpa.attention_vjp(q, k, v, wrapped)[1](dout)
    assert len(got) == len(want) == (4 if kind == "float" else 3)  # a float mask's gradient, in its shape
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_a_block_mask_checks_what_it_wraps(rng):
    q, k, v, mask = _inputs(rng, "bool")
    with pytest.raises(cusdpa.ArgumentTypeError, match="BlockMask takes an array"):
        cusdpa.BlockMask(mask.tolist())
    with pytest.raises(cusdpa.ArgumentError, match="does not broadcast"):
        cusdpa.scaled_dot_product_attention(q, k, v, cusdpa.BlockMask(mask[..., :5]))
    with pytest.raises(cusdpa.ArgumentTypeError, match="not supported"):
        cusdpa.scaled_dot_product_attention(q, k, v, cusdpa.BlockMask(mask.astype(np.int32)))


def test_torch_summaries_are_kept_per_storage_until_it_changes_or_goes():
    torch = pytest.importorskip("torch")
    from interop import mask_summaries

    mask = torch.rand(2, 1, 8, 8) < 0.5
    kept = mask_summaries._summaries_of(mask)
    kept["summary"] = "made"
    assert mask_summaries._summaries_of(mask) is kept                 # the same mask, unchanged
    assert mask_summaries._summaries_of(mask[:, :, 2:]) is kept       # a view of its storage (its own keys)
    assert mask_summaries._summaries_of(mask.clone()) is not kept     # another storage
    mask[0, 0, 0, 0] = True                                           # an in-place change: the version moves
    assert mask_summaries._summaries_of(mask) is kept and not kept    # the same entry, emptied
    kept["summary"] = "made again"
    held = len(mask_summaries._held)
    del mask
    gc.collect()
    assert len(mask_summaries._held) == held - 1                      # the storage went, and its summaries
