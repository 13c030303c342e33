"""The README's and docs/' Python examples run as written."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [(page.relative_to(ROOT), block) for page in PAGES
          for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)]


def test_the_readme_and_docs_have_python_examples():
    assert sum(1 for page, _ in BLOCKS if page.name == "README.md") >= 2
    assert len(BLOCKS) >= 10


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"{page}-{i}" for i, (page, _) in enumerate(BLOCKS)])
def test_python_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples may write run folders
    page, block = BLOCKS[index]
    exec(compile(block, f"{page} python block {index + 1}", "exec"), {"__name__": "readme"})
