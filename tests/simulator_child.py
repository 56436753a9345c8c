"""Simulator cases of a test module, run in a child process with NUMBA_ENABLE_CUDASIM=1.

Numba reads the variable once, at import, so simulator cases cannot share the pytest process with GPU
tests. The parent (``results``) runs the test file as a script with the session seed; the script's
``__main__`` block calls ``serve``, which runs the cases in a process pool and prints one JSON object:
case name -> list of failure messages.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import traceback
from concurrent.futures import ProcessPoolExecutor


def results(test_file: str) -> dict[str, list[str]]:
    """Run ``test_file``'s cases on the simulator in a child process; name -> failures."""
    import pytest
    from conftest import SESSION_SEED

    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([sys.executable, test_file, str(SESSION_SEED)], env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"simulator child failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_passed(results: dict, name: str) -> None:
    """The parent's side of one case: its failures, if any, fail the test."""
    failures = results[name]
    assert not failures, "\n".join(failures)


def _guarded(run_case, name_seed):
    try:
        return run_case(name_seed)
    except Exception as e:  # reported as the case's failure, with its type and message
        return name_seed[0], [f"{type(e).__name__}: {e}\n{traceback.format_exc()}"]


def serve(run_case, names) -> None:
    """The child's side: ``run_case((name, seed)) -> (name, failures)`` for every name, seed from argv; an
    exception becomes the case's failure."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from cusdpa import environment

    assert environment.simulator_enabled()
    seed = int(sys.argv[1])
    with ProcessPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        print(json.dumps(dict(pool.map(functools.partial(_guarded, run_case), [(name, seed) for name in names]))))
