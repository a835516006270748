"""The layers of train/ (docs/layers.md): commands consume the library and never each other, every shared
helper has one home, and the package surface the layers rely on exists. Imports are read with `ast`, so
a lazy import inside a function counts as much as one at the top."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.support import REPO

TRAIN = REPO / "train"
COMMANDS = TRAIN / "commands"


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, as an absolute dotted name (relative imports resolved)."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from . import sweep`
    return found


def command_modules() -> list[Path]:
    return sorted(p for p in COMMANDS.glob("*.py") if p.name != "__init__.py")


def test_there_is_one_module_per_command():
    from train.cli import COMMANDS as REGISTERED

    assert {p.stem for p in command_modules()} == {"default", "run", "sweep", "osr", "clean", "demo789"}
    assert {module for module, _ in REGISTERED.values()} == {
        f"train.commands.{p.stem}" for p in command_modules()
    }


@pytest.mark.parametrize("path", command_modules(), ids=lambda p: p.stem)
def test_a_command_never_imports_another_command(path):
    others = {f"train.commands.{p.stem}" for p in command_modules()} - {f"train.commands.{path.stem}"}
    assert imported_modules(path) & others == set()


def test_the_import_reader_sees_relative_and_lazy_imports(tmp_path):
    probe = COMMANDS / "probe_for_test.py"
    try:
        probe.write_text("def main():\n    from .osr import main\n    from . import sweep\n")
        assert {"train.commands.osr", "train.commands.sweep"} <= imported_modules(probe)
    finally:
        probe.unlink()


def test_the_library_never_imports_a_command():
    """Only the dispatcher (train/cli.py, by name through importlib) knows the commands."""
    library = [p for p in TRAIN.rglob("*.py") if COMMANDS not in p.parents]
    offenders = {
        str(p.relative_to(REPO)): sorted(m for m in imported_modules(p) if m.startswith("train.commands"))
        for p in library
    }
    assert {k: v for k, v in offenders.items() if v} == {}


# helper -> where it lives; the old copies' names must be gone
HOMES = {
    "precision_at_k": "drainage_fast/openset.py",
    "precision_curve": "drainage_fast/openset.py",
    "drainage_probability": "drainage_fast/openset.py",
    "best_points": "train/grid.py",
    "reproducing_command": "train/grid.py",
    "write_csv": "train/report/tables.py",
    "pd_histograms": "train/report/figures.py",
    "pyplot": "train/report/figures.py",
    "as_long": "train/data/core.py",
    # selective classification (issue 22): the metrics in the library, the tables in the report
    "risk_coverage_curve": "drainage_fast/openset.py",
    "aurc": "drainage_fast/openset.py",
    "selective_risk": "drainage_fast/openset.py",
    "selective_threshold": "drainage_fast/openset.py",
    "selective_confidences": "drainage_fast/openset.py",
    "selective_table": "train/report/tables.py",
    "mean_risk_coverage": "train/selective.py",
    "plot_risk_coverage": "train/report/figures.py",
}
GONE = (
    "_as_long",
    "write_rows",
    "select_per_loss",
    "select_per_method",
    "_pd_histograms",
    "_precision_panel",
    "_save_figure",
    "_pyplot",
    "tuning_grid_set_flags",
)


def definitions() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in [*TRAIN.rglob("*.py"), *(REPO / "drainage_fast").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                found.setdefault(node.name, []).append(str(path.relative_to(REPO)))
    return found


def test_every_shared_helper_has_one_home():
    defs = definitions()
    assert {name: defs.get(name) for name in HOMES} == {name: [home] for name, home in HOMES.items()}
    assert {name: defs[name] for name in GONE if name in defs} == {}


def test_the_report_imports_nothing_of_the_train_library_but_itself():
    """train/report/ once imported train/openset/ (its method table and score readers), the one import
    against the layer order: a figure now draws what its caller read and passes in."""
    offenders = {
        str(p.relative_to(REPO)): sorted(
            m for m in imported_modules(p) if m.startswith("train.") and not m.startswith("train.report")
        )
        for p in (TRAIN / "report").glob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_resnet_alias_is_gone_and_nothing_imports_it():
    assert not (TRAIN / "resnet.py").exists()
    sources = [*TRAIN.rglob("*.py"), *(REPO / "benchmarks").rglob("*.py"), *(REPO / "tests").rglob("*.py")]
    assert [str(p) for p in sources if "train.resnet" in imported_modules(p)] == []


def test_only_the_grid_helper_writes_a_reproducing_command():
    """demo789 once wrote its command line by hand; every command now asks grid.reproducing_command."""
    for path in command_modules():
        tree = ast.parse(path.read_text())
        docstrings = {
            id(n.body[0].value)
            for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef))
            and n.body
            and isinstance(n.body[0], ast.Expr)
            and isinstance(n.body[0].value, ast.Constant)
        }
        literals = [
            n.value
            for n in ast.walk(tree)
            if isinstance(n, ast.Constant)
            and isinstance(n.value, str)
            and id(n) not in docstrings
            and n.value.startswith("python -m train ")
        ]
        assert literals == [], path.name


def test_drainage_fast_openset_is_an_attribute_of_the_package():
    code = "import drainage_fast; print(drainage_fast.openset.precision_at_k([0.9, 0.1, 0.8], [1, 0, 0]))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "1.0", out.stderr


def test_the_report_package_has_a_public_pyplot():
    from train.report import pyplot

    assert pyplot().get_backend().lower() == "agg"


def test_every_declared_pytest_marker_is_used():
    """pyproject.toml once declared a `slow` marker that no test carried."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    declared = [m.split(":")[0].strip() for m in config.get("markers", [])]
    sources = "\n".join(p.read_text() for p in (REPO / "tests").rglob("*.py"))
    assert [m for m in declared if f"mark.{m}" not in sources] == []
