"""Verification: one error rule, one yardstick and one harness, shared by every test, ``python -m cusdpa
check`` (its suite and its fuzz) and the benchmarks.

``judge`` states the error rule (a backend's error against the float64 reference may be at most a few
times PyTorch's error at the same precision, plus a floor); ``yardstick`` computes that PyTorch error's
source, attention in torch at the problem's precision, for any validated Problem; ``harness`` runs
attention through a backend (or a torch function) and judges it; ``check`` holds the check command's
targets and suite, ``fuzz`` its random cases; ``selfcheck`` tests the reference against Philox's known
answers and a per-row softmax.
"""
