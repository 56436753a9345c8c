"""Host time of EFFICIENT's Python wrapper alone, on the CPU: the kernels' launches replaced by a no-op, NumPy
arrays (B=1 H=8 L=S=128 E=64 fp16, a bool mask), so what is timed is problem building, views, placeholders and
the kernels' arguments (kernels_numba/attention.py), not Numba's launches (kernels_numba/launcher.py) or CuPy's.

    python benchmarks/efficient_host.py

Minimum and median of 15 rounds of 200 calls, microseconds per call.
"""
import time

import numpy as np

import kernels_numba.attention
import kernels_numba.layout
from cusdpa import problem
from cusdpa.backends import efficient

# no kernels: the wrapper's own work only (the launcher's part is timed on the GPU, benchmarks/overhead.py)
kernels_numba.layout.device_of = lambda x: 0
kernels_numba.attention.variant_for = lambda pr, cfg: "portable"
kernels_numba.attention.launcher.launch = lambda *a: None
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((1, 8, 128, 64)).astype(np.float16) for _ in range(3))
mask = rng.random((1, 1, 128, 128)) > 0.2
def fwd():
    return efficient.IMPL.forward(problem.from_dense(q, k, v, mask, problem.Options()))
out, lse = fwd()
def bwd():
    return efficient.IMPL.backward(problem.from_dense(q, k, v, mask, problem.Options()), out, lse, q)
for name, f in (("forward", fwd), ("backward", bwd)):
    best = []
    for _ in range(15):
        t = time.perf_counter()
        for _ in range(200): f()
        best.append((time.perf_counter() - t) / 200 * 1e6)
    print(f"{name}: min {min(best):.0f} us, median {sorted(best)[7]:.0f} us")
