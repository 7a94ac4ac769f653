"""anomalib 2.7.0's FoundAD source, for the parity test only (anomalib is never a dependency).

``ensure_anomalib_source()`` installs the wheel's files, without any of its dependencies, into
``$ANOMALIB_SOURCE`` (default ``<repo>/.data/anomalib-2.7.0``, git-ignored) with pip, once.
``load_anomalib_projector()`` imports only the modules the projector needs (its file, the
DINOv2 ``Attention`` and the Dinomaly MLP, all torch-only) with our torch, without running
anomalib's package ``__init__`` files (which import lightning and more).

CI: ``.venv/bin/python -m tests.core.foundad.anomalib_source`` before the tests.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

VERSION = "2.7.0"
REPO = Path(__file__).resolve().parents[3]
PROJECTOR_MODULE = "anomalib.models.image.foundad.components.manifold_projector"
# packages whose __init__ must not run (heavy imports); their modules load from the path
_STUB_PACKAGES = (
    "anomalib",
    "anomalib.models",
    "anomalib.models.components",
    "anomalib.models.image",
    "anomalib.models.image.dinomaly",
    "anomalib.models.image.dinomaly.components",
    "anomalib.models.image.foundad",
    "anomalib.models.image.foundad.components",
)


def source_dir() -> Path:
    return Path(os.environ.get("ANOMALIB_SOURCE") or REPO / ".data" / f"anomalib-{VERSION}")


def _installed(root: Path) -> bool:
    return (root / Path(*PROJECTOR_MODULE.split("."))).with_suffix(".py").is_file()


def ensure_anomalib_source(root: Path | None = None) -> Path:
    """The directory holding ``anomalib/`` (installed with ``pip --no-deps --target`` if absent)."""
    root = root or source_dir()
    if not _installed(root):
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
        cmd += ["--target", str(root), f"anomalib=={VERSION}"]
        subprocess.run(cmd, check=True)
    if not _installed(root):
        raise FileNotFoundError(f"anomalib {VERSION} FoundAD source not found under {root}")
    return root


def load_anomalib_projector(root: Path) -> type:
    """anomalib's ``ManifoldProjector`` class from ``root``; sys.modules is left as it was."""
    before = {k: v for k, v in sys.modules.items() if k == "anomalib" or k.startswith("anomalib.")}
    if before:
        raise RuntimeError("an anomalib package is already imported; refusing to shadow it")
    try:
        for name in _STUB_PACKAGES:
            stub = types.ModuleType(name)
            stub.__path__ = [str(root / Path(*name.split(".")))]
            sys.modules[name] = stub
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # anomalib's dinov2 deprecation
            return importlib.import_module(PROJECTOR_MODULE).ManifoldProjector
    finally:
        for name in [k for k in sys.modules if k == "anomalib" or k.startswith("anomalib.")]:
            del sys.modules[name]


if __name__ == "__main__":
    print(ensure_anomalib_source())
