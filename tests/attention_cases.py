"""The GPU tests' harness lives in the package (``python -m cusdpa check`` runs it too): cusdpa.check."""
from cusdpa.check import Case, make_inputs, problem, run_case  # noqa: F401
