"""Verification: one judging rule, one harness and one self-check, shared by every test, the ``check``
and ``fuzz`` commands and the benchmarks.

``judge`` states the error rule (a backend's error against the float64 reference may be at most a few
times PyTorch's error at the same precision); ``harness`` runs attention cases through a backend and
judges them; ``selfcheck`` tests the reference against Philox's known answers and a per-row softmax.
"""
