"""Shared fixtures: fresh random inputs per run (seed reported, replay with CUSDPA_TEST_SEED), GPU skips."""
import os
import secrets
import zlib

import numpy as np
import pytest

SESSION_SEED = int(os.environ.get("CUSDPA_TEST_SEED", secrets.randbits(32)))


def pytest_addoption(parser):
    parser.addoption("--shard", default=None, metavar="I/N",
                     help="run the I-th of N shards (0 <= I < N): every N-th collected test from the I-th on, so N "
                          "processes side by side run each test once (benchmarks/sharded_pytest.sh)")


def pytest_collection_modifyitems(config, items):
    shard = config.getoption("--shard")
    if shard is None:
        return
    index, count = (int(x) for x in shard.split("/"))
    if not 0 <= index < count:
        raise pytest.UsageError(f"--shard {shard}: I must be in [0, N)")
    # round robin over the collection order: neighbours (one test's parameters) cost alike, so shards even out
    kept, dropped = items[index::count], [x for n, x in enumerate(items) if n % count != index]
    config.hook.pytest_deselected(items=dropped)
    items[:] = kept


def pytest_report_header(config):
    return f"cusdpa random seed: {SESSION_SEED} (replay with CUSDPA_TEST_SEED={SESSION_SEED})"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # again after failures: -q (the GPU machine's stages) drops the header, and a failure on random inputs is
    # only worth as much as its replay
    if terminalreporter.stats.get("failed") or terminalreporter.stats.get("error"):
        terminalreporter.write_line(pytest_report_header(config))


@pytest.fixture
def rng(request):
    """A generator seeded from the session seed and the test id: fresh each run, reproducible on demand."""
    return np.random.default_rng([SESSION_SEED, zlib.crc32(request.node.nodeid.encode())])


def pytest_runtest_setup(item):
    # Queried at run time, never at import or collection: a CPU machine skips without touching CUDA.
    if item.get_closest_marker("gpu"):
        from cusdpa import environment

        problem = environment.cupy_problem()
        if problem:
            pytest.skip(f"needs a CUDA GPU: {problem}")


@pytest.fixture(scope="module")
def simulator_results(request):
    """The test module's simulator cases (its ``__main__`` serves them, tests/simulator_child.py), run in a
    child process with NUMBA_ENABLE_CUDASIM=1: name -> failures."""
    import simulator_child

    return simulator_child.results(request.module.__file__)
