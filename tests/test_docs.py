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
        "install",
        "gpu",
        "tracking",
        "mmengine",
        "lightning",
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


def test_the_site_and_its_api_reference_build_with_warnings_as_errors(tmp_path):
    """mkdocs + mkdocstrings from mkdocs.yml, ``--strict``: a broken link, a missing page or an API entry that
    does not resolve fails the build."""
    import subprocess
    import sys

    mkdocs = Path(sys.executable).parent / "mkdocs"
    done = subprocess.run(
        [str(mkdocs), "build", "--strict", "-d", str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    reference = {
        page.stem: (tmp_path / "site" / "api" / page.stem / "index.html").read_text()
        for page in (ROOT / "docs" / "api").glob("*.md")
    }
    for page, names in {
        "steps": ["make_train_step", "make_eval_step", "TrainState"],
        "runner": ["Runner", "check_model_functions"],
        "hooks": ["ProfilerHook", "LoggerHook", "CheckpointHook"],
        "logging": ["WandbVisBackend", "MLflowVisBackend", "TerminalHandler", "plot_run"],
        "metrics": ["TorchMetric", "TopK", "BaseMetric"],
        "optim": ["adamw", "inject_hyperparams"],
    }.items():
        for name in names:
            assert f'id="{name}"' in reference[page] or f'.{name}"' in reference[page], (page, name)
    nav = (ROOT / "mkdocs.yml").read_text()
    assert all(f" {page.name}" in nav for page in PAGES if page.parent.name == "docs")  # every guide is listed
