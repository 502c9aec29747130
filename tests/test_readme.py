"""README examples marked ``<!-- runs as written: tests/test_readme.py -->``
run as written, so the README cannot rot: each marked ```python block is
written to a file of its own and run there (trace bodies are read from their
source file, as in a user's script)."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
MARK = "<!-- runs as written: tests/test_readme.py -->"


def marked_blocks(text: str) -> list[tuple[int, str]]:
    """``(line, code)`` of every ```python block right after the mark."""
    blocks = []
    pattern = re.compile(r"^" + re.escape(MARK) + r"[ \t]*\n```python\n(.*?)\n```", re.S | re.M)
    for found in pattern.finditer(text):
        blocks.append((text.count("\n", 0, found.start(1)) + 1, found.group(1)))
    return blocks


BLOCKS = marked_blocks(README.read_text(encoding="utf-8"))


def test_the_mark_is_found_and_every_mark_has_a_block():
    text = README.read_text(encoding="utf-8")
    assert BLOCKS, f"no block marked {MARK!r} in README.md"
    marks = re.findall(r"^" + re.escape(MARK) + r"[ \t]*$", text, re.M)  # a mark is a line of its own
    assert len(marks) == len(BLOCKS), "a mark is not followed by a ```python block"


def test_marked_blocks_are_extracted_whole():
    text = f"a\n{MARK}\n```python\nx = 1\ny = 2\n```\n\n```python\nz = 3\n```\nsee `{MARK}`\n```python\nw = 4\n```\n"
    assert marked_blocks(text) == [(4, "x = 1\ny = 2")]


@pytest.mark.parametrize("line,code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_block_runs_as_written(line, code, tmp_path, capsys):
    script = tmp_path / f"readme_line_{line}.py"
    script.write_text(code + "\n", encoding="utf-8")
    runpy.run_path(str(script), run_name="__main__")
    capsys.readouterr()  # what it printed is the reader's; running to the end is the test
