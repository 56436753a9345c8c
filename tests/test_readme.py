"""Every ```python block of README.md runs, each in a fresh namespace, as a new user would paste it.

A block is found by its fence alone, so a block added to the README is tested without touching this
file. ```python runs everywhere (CPU-only machines take NumPy arrays and torch CPU tensors through the
NumPy reference); ```python gpu runs only where the `gpu` marker does (a CUDA GPU with CuPy). A block that
imports an optional dependency that is not installed is skipped, naming the extra that installs it. A
warning raised at a README line fails the block: README code does not use deprecated or refused calls.
"""
import re
import warnings
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
TAGS = {"gpu"}  # words allowed after ```python
# optional dependencies a block may import: module -> the extra that installs it
EXTRAS = {"torch": "torch", "transformers": "hf", "cupy": "cuda", "numba": "cuda", "ml_dtypes": "cuda",
          "matplotlib": "bench", "tqdm": "bench"}

FENCE = re.compile(r"^```(?P<info>.*)$")


def blocks(text: str) -> list[tuple[int, str, str]]:
    """(line of the opening fence, info string, code) of every fenced block, in order."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].rstrip() == "```"), None)
        if end is None:
            raise ValueError(f"README.md:{i + 1}: a fence that never closes")
        out.append((i + 1, m["info"].strip(), "\n".join(lines[i + 1:end]) + "\n"))
        i = end + 1
    return out


def python_blocks() -> list:
    params = []
    for line, info, code in blocks(README.read_text()):
        words = info.split()
        if not words or words[0] != "python":
            continue
        marks = [pytest.mark.gpu] if "gpu" in words[1:] else []
        params.append(pytest.param(line, words[1:], code, marks=marks, id=f"README.md:{line}"))
    return params


def test_the_readme_has_python_blocks_and_every_fence_is_understood():
    found = blocks(README.read_text())
    assert python_blocks(), "no ```python block found in README.md"
    for line, info, _ in found:
        words = info.split()
        if words and words[0] in ("py", "python3", "pycon", "ipython"):
            pytest.fail(f"README.md:{line}: ```{info} is not run by this test; write ```python")
        if words and words[0] == "python" and set(words[1:]) - TAGS:
            pytest.fail(f"README.md:{line}: unknown tag(s) {sorted(set(words[1:]) - TAGS)} after ```python "
                        f"(known: {sorted(TAGS)})")


@pytest.mark.parametrize("line, tags, code", python_blocks())
def test_readme_block_runs(line, tags, code):
    # blank lines first, so a traceback names the README's own line numbers
    compiled = compile("\n" * line + code, str(README), "exec")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            exec(compiled, {"__name__": "__readme__"})
        except ModuleNotFoundError as e:
            top = (e.name or "").split(".")[0]
            if top not in EXTRAS:
                raise
            pytest.skip(f"README.md:{line} imports {top}, not installed here (pip install -e '.[{EXTRAS[top]}]')")
    mine = [f"README.md:{w.lineno}: {w.category.__name__}: {w.message}" for w in caught
            if Path(w.filename) == README]
    assert not mine, "\n".join(mine)


def test_the_parser_sees_fences_and_tags():
    text = "x\n```python\na = 1\n```\n```sh ci-test\nls\n```\n```python gpu\nb = 2\n\n```\n"
    assert blocks(text) == [(2, "python", "a = 1\n"), (5, "sh ci-test", "ls\n"), (8, "python gpu", "b = 2\n\n")]
