"""python -m cusdpa info on this machine."""
import subprocess
import sys

from cusdpa import environment


def test_info_explains_each_backend():
    run = subprocess.run([sys.executable, "-m", "cusdpa", "info"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    text = run.stdout
    assert "reference self-check: ok" in text
    for name in ("FLASH", "EFFICIENT", "MATH"):
        assert name in text
    assert "numpy" in text and "python" in text
    if environment.cupy_problem():  # CPU-only machine: FLASH must say why it cannot run
        flash_line = next(line for line in text.splitlines() if line.strip().startswith("FLASH"))
        assert "not available" in flash_line and "CuPy" in flash_line
