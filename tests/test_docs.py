"""The code examples in docs/guide.md run, in order, as one program."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.mark.parametrize("page", ["guide.md"])
def test_guide_examples_run(page):
    text = (DOCS / page).read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, f"no python examples found in {page}"
    namespace: dict = {}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{page}[block {i}]", "exec"), namespace)
        except Exception as exc:  # noqa: BLE001 - report which block failed, then re-raise
            raise AssertionError(f"{page}: example block {i} failed: {exc!r}\n{block}") from exc


def test_docs_cite_docs_math_not_the_internal_spec():
    """Users have docs/math.md, not the project's internal spec: citations must point there."""
    root = DOCS.parent
    paths = [
        *DOCS.glob("*.md"),
        root / "README.md",
        *root.glob("inf/**/*.py"),
        *root.glob("experiments/**/*.py"),
    ]
    offenders = [
        str(p.relative_to(root)) for p in paths if re.search(r"\bspec §", p.read_text(encoding="utf-8"))
    ]
    assert not offenders, f"'spec §N' citations (use docs/math.md §N): {offenders}"
