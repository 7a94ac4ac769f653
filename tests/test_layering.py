"""Layering: ``anomalydino_core`` is arrays in, arrays out. None of its modules imports the I/O,
orchestration or service layers (Prefect, fsspec/s3fs, Zarr, pyarrow, network clients, or
anything from tasks/, flows/, infra/), and none reads the environment."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "anomalydino_core"

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


def test_the_checks_catch_what_they_forbid() -> None:
    tree = ast.parse(
        "import os as o\nimport fsspec.core\nfrom tasks.weights import load_backbone\n"
        "from . import images\nfrom os import getenv\nx = o.environ.get('A')\n"
    )
    assert [n for _, n in _imported(tree)] == ["os", "fsspec.core", "tasks.weights", "os"]
    assert sorted(w for _, w in _env_access(tree)) == ["from os import getenv", "o.environ"]
