"""The shape of the code base: small modules, no import cycles, errors at the bottom, tools outside the package,
and tests that use only public names of other modules (see docs/architecture.md)."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "funceng"
MAX_MODULE_LINES = 400
EXTERNAL_PRIVATE_OK = {"torch", "os", "sys"}  # `torch._dynamo`, `os._exit`: other libraries' own spelling


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The funceng modules ``path`` imports anywhere (module level or inside functions), except under
    ``if TYPE_CHECKING:``; ``from funceng import x`` counts as importing ``funceng.x`` when that is a module."""
    tree = ast.parse(path.read_text())
    type_checking = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
        for n in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names
            }
    return {name for name in found if name in known}


def test_no_module_is_over_400_lines_and_the_runner_under_300():
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}
    assert sizes["funceng.runner.runner"] < 300


def test_the_package_has_no_import_cycle():
    known = set(modules())
    graph = {name: imported_modules(path, known) - {name} for name, path in modules().items()}
    visiting, done, cycles = [], set(), []

    def visit(name):
        if name in visiting:
            cycles.append(visiting[visiting.index(name) :] + [name])
            return
        if name in done:
            return
        visiting.append(name)
        for dependency in sorted(graph[name]):
            visit(dependency)
        visiting.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
    assert cycles == []


def test_errors_import_nothing_from_funceng_and_every_module_raises_funceng_errors_from_there():
    known = set(modules())
    assert imported_modules(PACKAGE / "errors.py", known) == set()
    defined = {}
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                getattr(b, "id", "") in ("ValueError", "RuntimeError") for b in node.bases
            ):
                defined[node.name] = name
    assert defined == {
        "ConfigError": "funceng.errors",
        "CheckpointError": "funceng.errors",
        "DonatedStateError": "funceng.errors",
        "DistributedError": "funceng.errors",
    }


def test_cli_help_imports_neither_the_benchmarks_nor_the_runner():
    probe = (
        "import sys, funceng.cli as cli\n"
        "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m in ('compare', 'workloads', 'funceng.runner')))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert not (PACKAGE / "bench.py").exists() and (ROOT / "benchmarks" / "workloads.py").exists()


def test_the_version_comes_from_package_metadata():
    from importlib.metadata import version

    import funceng

    assert funceng.__version__ == version("funceng")
    for path in PACKAGE.rglob("*.py"):
        assert "from funceng import __version__" not in path.read_text(), path


def private_names_used_across_modules(path: Path) -> list[str]:
    """``from x import _name`` and ``obj._name`` in a test file, where ``_name`` is not the file's own."""
    tree = ast.parse(path.read_text())
    own = {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    own |= {
        t.id for node in ast.walk(tree) if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if getattr(root, "id", None) not in EXTERNAL_PRIVATE_OK and node.attr not in own:
                found.append(f"{ast.unparse(node)} (line {node.lineno})")
    return found


def test_tests_use_only_public_names_of_other_modules():
    used = {p.name: private_names_used_across_modules(p) for p in sorted(Path(__file__).parent.glob("*.py"))}
    assert {name: found for name, found in used.items() if found} == {}
