"""The command line starts fast (help and version without importing torch), and every optional dependency is an
error naming the extra to install; each extra holds what its command imports."""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, prelude: str = "") -> tuple[subprocess.CompletedProcess, float]:
    probe = (
        f"import sys\n{prelude}\nimport funceng.cli as cli\n"
        f"try:\n    code = cli.main({list(args)!r})\nexcept SystemExit as exc:\n    code = exc.code\n"
        "print('torch imported:', 'torch' in sys.modules, file=sys.stderr)\nsys.exit(code)"
    )
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    return done, time.perf_counter() - start


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["train", "--help"]])
def test_help_and_version_answer_in_under_a_second_without_importing_torch(args):
    done, seconds = cli(*args)
    assert done.returncode == 0 and "torch imported: False" in done.stderr
    assert seconds < 1.0, f"funceng {' '.join(args)} took {seconds:.2f} s"
    if args == ["--version"]:
        from importlib.metadata import version

        assert done.stdout.strip() == f"funceng {version('funceng')}"


def test_the_installed_command_prints_its_version():
    funceng = Path(sys.executable).parent / "funceng"
    done = subprocess.run([str(funceng), "--version"], capture_output=True, text=True, check=True)
    assert re.fullmatch(r"funceng \S+\n", done.stdout)


def test_plot_without_matplotlib_names_the_extra(tmp_path):
    (tmp_path / "run" / "vis_data").mkdir(parents=True)
    (tmp_path / "run" / "vis_data" / "scalars.json").write_text('{"loss": 1.0, "iter": 1, "step": 1}\n')
    done, _ = cli("plot", str(tmp_path), prelude="sys.modules['matplotlib'] = None")
    assert done.returncode == 2
    assert (
        "funceng plot needs the 'matplotlib' package, which is not installed: pip install 'funceng[vis]'" in done.stderr
    )


def test_every_extra_named_in_an_error_exists_and_the_demo_extra_holds_what_the_demo_imports():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = set()
    for path in (ROOT / "funceng").rglob("*.py"):
        named |= set(re.findall(r"require\(\s*\"[\w.]+\",\s*\"(\w+)\"", path.read_text()))
        named |= set(re.findall(r"funceng\[(\w+)\]", path.read_text()))
    assert named >= {"vis", "wandb", "mlflow", "metrics"} and named <= set(extras)
    assert {"scikit-learn", "matplotlib", "tensorboard"} <= set(extras["demo"])  # digits, plots, TensorBoard
    assert {"mmengine", "lightning", "torchvision"} <= set(extras["bench"])


def test_bench_accepts_the_standalone_pytorch_lightning(monkeypatch):
    import importlib.util

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import compare

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lightning" else real(name, *a))
    assert compare.lightning_package() == "pytorch_lightning"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if "lightning" in name else real(name, *a))
    assert compare.lightning_package() is None
    assert "neither lightning nor pytorch_lightning" in compare.unavailable("d", "mlp", cuda=False)


def test_bench_quick_says_what_it_measures():
    done = subprocess.run(
        [sys.executable, "-m", "funceng", "bench", "--help"], capture_output=True, text=True, cwd=ROOT, check=True
    )
    text = " ".join(done.stdout.split())
    assert "--quick the mlp workload only" in text and "in under 3 minutes on 2 CPU cores" in text


def test_dataset_names_and_epsilon_without_their_extras_name_them(monkeypatch):
    from funceng.errors import MissingExtraError
    from funceng.privacy import epsilon
    from funceng.registry import DATASETS

    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(MissingExtraError, match=r"dataset type 'CIFAR10' .*pip install 'funceng\[vision\]'"):
        DATASETS.get("CIFAR10", "train_dataloader.dataset.type")
    monkeypatch.setitem(sys.modules, "opacus", None)
    monkeypatch.setitem(sys.modules, "opacus.accountants", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'funceng\[privacy\]'"):
        epsilon(1.0, 0.01, 100, 1e-5)
