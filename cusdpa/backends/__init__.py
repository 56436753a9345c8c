"""The backends dispatch chooses among: ``flash`` (CuPy RawKernels on tensor cores), ``efficient`` (Numba
CUDA kernels), ``math`` (the reference's unfused computation). Each module exposes an ``IMPL``
(``cusdpa.dispatch.Implementation``); ``launch`` issues prepared kernel launches for any of them."""
