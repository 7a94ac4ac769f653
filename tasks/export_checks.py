"""Checks of exported models against fp32 torch, kept beside each export.

An exported runtime is checked (cosine >= 0.999 per patch) on its first use per input size on a
machine; the outcome is kept in ``<export>/checks/<digest>.json`` (CPU, runtime version,
precision, threads, streams, input size), so later processes skip the 2-3.5 s of a ViT-S check
at 448 (AMD EPYC, 2 vCPUs).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import importlib.metadata
import json
import logging
from pathlib import Path

import torch

from anomalydino_core.runtimes import MIN_PATCH_COSINE, ExportCheck
from tasks.machine import cpu_identity, write_cache_json

log = logging.getLogger(__name__)


def check_file(
    folder: Path,
    fmt: str,
    precision: str,
    threads: int,
    input_hw: tuple[int, int],
    streams: int = 1,
) -> Path:
    """Where the check of the export in ``folder`` is kept: one per CPU, runtime version,
    precision, threads (and streams, when several) and input size (the export itself is
    content-addressed)."""
    key: dict[str, object] = {
        "cpu": cpu_identity(),
        "runtime": fmt,
        "versions": runtime_versions(fmt),
        "precision": precision,
        "threads": int(threads),
        "input_hw": list(input_hw),
        "min_patch_cosine": MIN_PATCH_COSINE,
    }
    if streams > 1:
        key["streams"] = int(streams)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return folder / "checks" / f"{digest}.json"


#: The package that runs each exported format.
RUNTIME_PACKAGE = {"openvino": "openvino", "onnx": "onnxruntime"}


def runtime_versions(fmt: str) -> dict[str, str]:
    package = RUNTIME_PACKAGE[fmt]
    return {"torch": torch.__version__, package: importlib.metadata.version(package)}


def read_check(path: Path) -> ExportCheck | None:
    """A check of this export made by an earlier process (None: none, or unreadable)."""
    try:
        d = json.loads(path.read_text())
        return ExportCheck(d["runtime"], tuple(d["input_hw"]), float(d["min_patch_cosine"]),
                           bool(d["passed"]))  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_check(path: Path, check: ExportCheck) -> None:
    """Keep ``check`` beside the export (best effort: a read-only cache checks every time)."""
    data = {**dataclasses.asdict(check), "checked_at": dt.datetime.now(dt.UTC).isoformat()}
    try:
        write_cache_json(path, data)
    except OSError as exc:
        log.warning("export check not kept at %s: %s", path, exc)
