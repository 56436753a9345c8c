"""python -m cusdpa check: passes on this machine, fails when a backend computes something wrong."""
import dataclasses
import os
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
