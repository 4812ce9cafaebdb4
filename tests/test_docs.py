"""Every Python snippet in the README and docs/ runs, page by page, in a scratch directory."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def snippets(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), re.S)


def test_every_docs_page_has_runnable_snippets():
    assert {p.stem for p in PAGES} >= {
        "README",
        "state",
        "steps",
        "optimizers",
        "runner",
        "checkpoints",
        "benchmarks",
        "distributed",
    }
    assert all(snippets(page) for page in PAGES)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_docs_snippets_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for i, code in enumerate(snippets(page)):
        try:
            exec(compile(code, f"{page.name} snippet {i + 1}", "exec"), namespace)
        except Exception as exc:  # re-raise with the snippet named
            raise AssertionError(f"{page.name}, snippet {i + 1} failed: {exc!r}") from exc
