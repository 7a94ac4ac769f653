"""Layering (docs/architecture.md): imports go down only.

- ``anomalydino_core`` is arrays in, arrays out: none of its modules imports the I/O,
  orchestration or service layers (Prefect, fsspec/s3fs, Zarr, pyarrow, network clients, or
  anything from tasks/, flows/, infra/), and none reads the environment;
- ``tasks`` import no ``flows``;
- no flow imports another flow: the modules of flows/ that hold a ``@flow`` are siblings, and
  the run plumbing they share lives in non-flow modules (flows/run.py, flows/banks.py...);
- no module of the project is over 400 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "anomalydino_core"
TASKS = REPO / "tasks"
FLOWS = REPO / "flows"
MAX_LINES = 400

FORBIDDEN_IN_CORE = {
    "prefect", "fsspec", "s3fs", "zarr", "pyarrow",  # I/O and orchestration
    "urllib", "requests", "huggingface_hub",  # downloads (weights: tasks/weights.py)
    "tasks", "flows", "infra",  # the layers above the core
}  # fmt: skip
ENV_NAMES = {"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"}


def _core_modules() -> list[Path]:
    modules = sorted(CORE.rglob("*.py"))
    assert modules, f"no modules under {CORE}"
    return modules


def _imported(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import; relative imports stay in the package."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def _env_access(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) for ``os.environ`` / ``os.getenv`` / ... and ``from os import environ``."""
    os_names = {"os"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            os_names |= {a.asname or a.name for a in node.names if a.name == "os"}
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr in ENV_NAMES
            and isinstance(node.value, ast.Name)
            and node.value.id in os_names
        ):
            found.append((node.lineno, f"{node.value.id}.{node.attr}"))
        elif isinstance(node, ast.ImportFrom) and node.module == "os":
            found += [
                (node.lineno, f"from os import {a.name}") for a in node.names if a.name in ENV_NAMES
            ]
    return found


@pytest.mark.parametrize("path", _core_modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_core_module_imports_no_io_or_upper_layer(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = [
        f"{path.relative_to(REPO)}:{line}: imports {name}"
        for line, name in _imported(tree)
        if name.split(".")[0] in FORBIDDEN_IN_CORE
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", _core_modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_core_module_reads_no_environment(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = [f"{path.relative_to(REPO)}:{line}: {what}" for line, what in _env_access(tree)]
    assert not bad, "\n".join(bad)


def _imported_anywhere(tree: ast.AST) -> set[str]:
    """Absolute names imported at any depth (also inside functions: a lazy import is still one)."""
    return {name for _, name in _imported(tree)}


def _flow_modules() -> set[str]:
    """``flows.<name>`` of every module that defines a Prefect flow."""
    found = set()
    for path in sorted(FLOWS.glob("*.py")):
        if "@flow" in path.read_text():
            found.add(f"flows.{path.stem}")
    assert found, f"no flow modules under {FLOWS}"
    return found


@pytest.mark.parametrize("path", sorted(TASKS.rglob("*.py")), ids=lambda p: p.name)
def test_tasks_import_no_flows(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = sorted(n for n in _imported_anywhere(tree) if n.split(".")[0] in {"flows", "infra"})
    assert not bad, f"{path.relative_to(REPO)} imports {bad}"


@pytest.mark.parametrize("path", sorted(FLOWS.glob("*.py")), ids=lambda p: p.name)
def test_no_flow_module_imports_another(path: Path) -> None:
    flows = _flow_modules()
    me = f"flows.{path.stem}"
    if me not in flows:
        return  # plumbing and the CLI may import flows (they run them)
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = sorted(n for n in _imported_anywhere(tree) if n in flows and n != me)
    assert not bad, f"{path.relative_to(REPO)} (a flow module) imports flow modules {bad}"


def test_no_module_over_400_lines() -> None:
    long = [
        f"{p.relative_to(REPO)}: {n} lines"
        for folder in ("anomalydino_core", "tasks", "flows", "infra", "bench")
        for p in sorted((REPO / folder).rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    ]
    assert not long, "split by job:\n" + "\n".join(long)


def test_the_checks_catch_what_they_forbid() -> None:
    tree = ast.parse(
        "import os as o\nimport fsspec.core\nfrom tasks.weights import load_backbone\n"
        "from . import images\nfrom os import getenv\nx = o.environ.get('A')\n"
    )
    assert [n for _, n in _imported(tree)] == ["os", "fsspec.core", "tasks.weights", "os"]
    assert sorted(w for _, w in _env_access(tree)) == ["from os import getenv", "o.environ"]
