"""python -m cusdpa check: passes on this machine, fails when a backend computes something wrong."""
import dataclasses
import os
import re
import subprocess
import sys

import pytest

from cusdpa import cli
from cusdpa.backends import math as math_backend

pytest.importorskip("torch")


def test_check_passes_on_this_machine():
    # The simulator keeps EFFICIENT to tiny shapes on any machine (a GPU machine would compile its kernels).
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    run = subprocess.run([sys.executable, "-m", "cusdpa", "check", "--seed", "5"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "check: ok" in run.stdout
    assert "EFFICIENT (numpy)  ok" in run.stdout and "MATH (numpy)       ok" in run.stdout


def _broken_math(monkeypatch, **changes):
    monkeypatch.setattr(math_backend, "IMPL", dataclasses.replace(math_backend.IMPL, **changes))


def test_check_fails_when_the_output_is_wrong(monkeypatch, capsys):
    right = math_backend.IMPL.forward

    def forward(pr, out=None, lse=None):
        out, lse = right(pr, out, lse)
        out[..., 0, 0] += 0.01  # one element per head, a few ulp of bf16 off
        return out, lse

    _broken_math(monkeypatch, forward=forward)
    assert cli.main(["check", "--backends", "math", "--seed", "1"]) == 1
    text = capsys.readouterr().out
    assert "MATH (numpy)       FAILED" in text and "out: max error" in text and "check: FAILED" in text


def test_check_fails_when_a_gradient_is_wrong(monkeypatch, capsys):
    right = math_backend.IMPL.backward

    def backward(pr, out, lse, dout, deterministic=False, grads=None):
        dq, dk, dv = right(pr, out, lse, dout, deterministic, grads)
        dk *= 1.01
        return dq, dk, dv

    _broken_math(monkeypatch, backward=backward)
    assert cli.main(["check", "--backends", "math", "--seed", "2"]) == 1
    text = capsys.readouterr().out
    assert "dk: max error" in text and "dq: max error" not in text


def test_check_fails_when_a_backend_crashes(monkeypatch, capsys):
    def forward(pr, out=None, lse=None):
        raise RuntimeError("kernel launch failed")

    _broken_math(monkeypatch, forward=forward)
    assert cli.main(["check", "--backends", "math", "--seed", "3"]) == 1
    assert "RuntimeError: kernel launch failed" in capsys.readouterr().out


def test_fuzz_passes_on_this_machine():
    # The simulator keeps EFFICIENT to tiny shapes on any machine, as above.
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    run = subprocess.run([sys.executable, "-m", "cusdpa", "check", "--fuzz", "6", "--seed", "7"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "FAILED" not in run.stdout and "check: ok" in run.stdout
    for target in ("EFFICIENT (numpy)", "MATH (numpy)"):
        passed = re.search(re.escape(target) + r" +ok: (\d+) cases passed", run.stdout)
        assert passed and int(passed.group(1)) > 0, run.stdout


def test_fuzz_finds_a_wrong_feature_and_prints_the_command_that_replays_it(monkeypatch, capsys):
    right = math_backend.IMPL.forward

    def forward(pr, out=None, lse=None):  # lower-right causal computed as upper-left
        return right(dataclasses.replace(pr, lower_right=False), out, lse)

    _broken_math(monkeypatch, forward=forward)
    assert cli.main(["check", "--fuzz", "1", "--seed", "11", "--backends", "math"]) == 1
    text = capsys.readouterr().out
    failed = [line for line in text.splitlines() if line.startswith("  FAILED MATH (numpy)")]
    assert failed and all("causal='lower_right'" in line and "out: max error" in line for line in failed), text
    assert re.search(r"MATH \(numpy\) +FAILED \(\d+ of \d+\): [1-9]\d* cases passed", text), text
    assert "check: FAILED" in text

    case, command = re.fullmatch(r"  FAILED MATH \(numpy\) (Case\(.*\)): .*; replay: (.*)", failed[-1]).groups()
    assert command.startswith("python -m cusdpa check --fuzz 0 --seed ")
    assert cli.main(command.split()[3:]) == 1  # that case alone, again
    replayed = capsys.readouterr().out
    assert f"  FAILED MATH (numpy) {case}: " in replayed and "from 1 case seeds" in replayed
    assert re.search(r"MATH \(numpy\) +FAILED \(1 of 1\)", replayed), replayed
