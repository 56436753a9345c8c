"""The bridge driving the EFFICIENT (Numba) backend on Numba's CUDA simulator: the one kernel backend
CI can run on torch tensors (CPU tensors reach it as NumPy views, bf16 included).

Numba reads NUMBA_ENABLE_CUDASIM once, when numba.cuda is first imported, so the checks run in a
child process started with it set (this file run as a script) and report their failures as JSON.
They skip, with EFFICIENT's own reasons, where that backend cannot run.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")


def check_dense(dtype_name):
    """GQA + float mask (with its gradient) through EFFICIENT, judged by the harness (the float64 reference,
    PyTorch's error at the same precision)."""
    import functools

    import numpy as np
    import torch

    import interop
    from cusdpa import Backend
    from cusdpa.verify import harness

    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*s, generator=g).to(dtype).requires_grad_() for s in ((2, 4, 7, 8), (2, 2, 9, 8),
                                                                                 (2, 2, 9, 8)))
    mask = torch.randn(4, 7, 9, generator=g).to(dtype).requires_grad_()
    efficient = functools.partial(interop.scaled_dot_product_attention, backend=Backend.EFFICIENT)
    return harness.run_torch(efficient, q, k, v, mask, rng=np.random.default_rng(0), enable_gqa=True)


def check_dropout_and_nested():
    """Dropout's keep-mask and the nested (varlen) path give what the reference gives, forward and backward."""
    import torch

    import interop
    from cusdpa import Backend

    g = torch.Generator().manual_seed(1)
    offsets = torch.tensor([0, 3, 3, 8])
    packed = [torch.randn(8, 2, 8, generator=g).requires_grad_() for _ in range(3)]
    q, k, v = (torch.nested.nested_tensor_from_jagged(t, offsets).transpose(1, 2) for t in packed)
    failures = []
    for backend in (Backend.EFFICIENT, Backend.MATH):
        torch.manual_seed(5)
        out = interop.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=True, backend=backend)
        values = out.transpose(1, 2).values()
        grads = torch.autograd.grad(values, packed, torch.ones_like(values))
        if backend is Backend.EFFICIENT:
            want = (values, *grads)
            continue
        for name, a, b in zip(("out", "dq", "dk", "dv"), want, (values, *grads)):
            if not torch.allclose(a, b, rtol=1e-5, atol=1e-6):  # a wrong keep-mask is off by O(1)
                failures.append(f"nested dropout {name}: EFFICIENT and MATH differ by {(a - b).abs().max():.3g}")
    return failures


def efficient_reasons():
    import numpy as np

    import cusdpa
    from cusdpa import Backend, dispatch, problem

    x = np.zeros((1, 1, 4, 8), np.float32)
    with cusdpa.sdpa_kernel(Backend.EFFICIENT):
        return dispatch.implementation(Backend.EFFICIENT).not_supported_reasons(problem.from_dense(x, x, x),
                                                                                need_grad=True)


def main():
    reasons = efficient_reasons()
    if reasons:
        print(json.dumps({"skip": reasons}))
        return
    print(json.dumps({"failures": check_dense("float32") + check_dense("bfloat16") + check_dropout_and_nested()}))


def test_bridge_drives_the_efficient_backend_on_the_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    if done.returncode:
        pytest.fail(f"child process failed:\n{done.stderr[-4000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if "skip" in report:
        pytest.skip("EFFICIENT cannot run here: " + "; ".join(report["skip"]))
    assert report["failures"] == []


if __name__ == "__main__":
    main()
