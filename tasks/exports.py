"""Exported backbones on disk: content-addressed, hash-checked, rebuilt when damaged.

An export lives in ``<base>/<format>/<backbone>-<H>x<W>-<digest>/`` where the digest is the
sha256 of its :class:`ExportKey` (weights sha256, input size, format, the exporter's versions and
rule): other weights or another exporter version never find it. Beside the model files a
``manifest.json`` holds the key and the sha256 of every file; a file that no longer matches
(a torn copy, a disk error, an edit) is logged, removed and exported again. ``base`` is
``<cache>/exports`` for the pipeline (``tasks/runtimes.py``) or ``anomalydino export --output``.
Exports are written to a temporary folder and renamed into place, so concurrent workers never
read half an export.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import timm
import torch

from anomalydino_core.backbones import LoadedBackbone
from anomalydino_core.runtimes import (
    EXPORT_RULE,
    ONNX_OPSET,
    OnnxRunner,
    OpenVinoRunner,
    compress_int8,
    export_rule,
    int8_rule,
    onnx_session_options,
    openvino_version,
    to_onnx,
    to_openvino,
)
from tasks.weights import sha256_file

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MODEL_FILE = {"openvino": "model.xml", "onnx": "model.onnx"}


def exporter_versions(fmt: str) -> dict[str, str]:
    """The library versions an export of ``fmt`` depends on (part of its key)."""
    versions = {"torch": torch.__version__, "timm": timm.__version__}
    if fmt == "openvino":
        versions["openvino"] = openvino_version()
    elif fmt == "onnx":
        import onnxscript

        versions.update(onnx_opset=str(ONNX_OPSET), onnxscript=onnxscript.__version__)
    else:
        raise ValueError(f"unknown export format {fmt!r}; choose openvino or onnx")
    return versions


def stored_weights(precision: str) -> str:
    """The weights an export stores for a model run at ``precision``: int8 for ``int8``
    (``compress_int8``), else fp32 (bf16 is OpenVINO's compile hint)."""
    return "int8" if precision == "int8" else "fp32"


@dataclass(frozen=True)
class ExportKey:
    """Everything an exported model's content depends on.

    ``stored_precision`` is fp32, or int8 for OpenVINO's int8 weights (``compress_int8``):
    OpenVINO applies bf16 when compiling (``INFERENCE_PRECISION_HINT``) and ONNX Runtime runs
    fp32, so one fp32 export serves both precisions.
    """

    format: str
    backbone: str
    weights_sha256: str
    input_hw: tuple[int, int]
    versions: tuple[tuple[str, str], ...]
    stored_precision: str = "fp32"
    rule: str = EXPORT_RULE

    @classmethod
    def of(
        cls,
        backbone: LoadedBackbone,
        fmt: str,
        input_hw: tuple[int, int],
        stored_precision: str = "fp32",
    ) -> ExportKey:
        if stored_precision not in ("fp32", "int8") or (stored_precision, fmt) == ("int8", "onnx"):
            raise ValueError(f"no {fmt} export stores {stored_precision} weights")
        versions, rule = exporter_versions(fmt), export_rule(fmt)
        if stored_precision == "int8":
            import nncf

            versions["nncf"] = nncf.__version__
            rule = f"{rule}; {int8_rule()}"
        return cls(
            format=fmt,
            backbone=backbone.identity.name,
            weights_sha256=backbone.identity.weights_sha256,
            input_hw=(int(input_hw[0]), int(input_hw[1])),
            versions=tuple(sorted(versions.items())),
            stored_precision=stored_precision,
            rule=rule,
        )

    def to_dict(self) -> dict:
        return {
            "format": self.format,
            "backbone": self.backbone,
            "weights_sha256": self.weights_sha256,
            "input_hw": list(self.input_hw),
            "versions": dict(self.versions),
            "stored_precision": self.stored_precision,
            "rule": self.rule,
        }

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def folder(self, base: Path) -> Path:
        h, w = self.input_hw
        return base / self.format / f"{self.backbone}-{h}x{w}-{self.digest()[:16]}"


def damage(folder: Path, key: ExportKey) -> str | None:
    """None when ``folder`` holds the complete export of ``key`` with every file's hash as its
    manifest says, else what is wrong."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return f"no {MANIFEST} in {folder}"
    try:
        manifest = json.loads(manifest_path.read_text())
        files: dict[str, str] = manifest["files"]
        stored_key = manifest["key"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{manifest_path} unreadable ({type(exc).__name__}: {exc})"
    if stored_key != key.to_dict():
        return f"{manifest_path} is the export of another key"
    if MODEL_FILE[key.format] not in files:
        return f"{manifest_path} lists no {MODEL_FILE[key.format]}"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        actual = sha256_file(path)
        if actual != expected:
            return f"{path} has sha256 {actual[:16]}..., its manifest says {expected[:16]}..."
    return None


def _write_export(backbone: LoadedBackbone, key: ExportKey, folder: Path) -> None:
    model_path = folder / MODEL_FILE[key.format]
    if key.format == "openvino":
        import openvino as ov

        model = to_openvino(backbone.module, key.input_hw)
        if key.stored_precision == "int8":
            model = compress_int8(model)
        ov.save_model(model, str(model_path), compress_to_fp16=False)
    else:
        to_onnx(backbone.module, key.input_hw).save(str(model_path))
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}
    manifest = {"key": key.to_dict(), "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def ensure_export(
    backbone: LoadedBackbone,
    fmt: str,
    input_hw: tuple[int, int],
    base: Path,
    stored_precision: str = "fp32",
) -> tuple[Path, bool]:
    """(the folder of a verified export of ``backbone`` for inputs ``input_hw`` with
    ``stored_precision`` weights, whether it was written now). A damaged export is logged,
    removed and written again."""
    key = ExportKey.of(backbone, fmt, input_hw, stored_precision)
    folder = key.folder(base)
    if folder.exists():
        why = damage(folder, key)
        if why is None:
            return folder, False
        log.warning("cached %s export damaged, exporting again: %s", fmt, why)
        shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        _write_export(backbone, key, tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process renamed its export into place first
            if damage(folder, key) is not None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s %s for %sx%s to %s", backbone.identity.name, fmt, *input_hw, folder)
    return folder, True


def open_export(
    folder: Path,
    fmt: str,
    *,
    precision: str,
    threads: int,
    machine: str | None = None,
    streams: int = 1,
):
    """A runner of the export in ``folder`` (OpenVINO compiled with ``precision`` in ``streams``
    streams; ONNX fp32). ``machine`` names this CPU: OpenVINO's compiled model is then cached
    beside the export, per machine (``_compiled_openvino``); None compiles without a cache."""
    model_path = folder / MODEL_FILE[fmt]
    if fmt == "openvino":
        compile_as = {"precision": precision, "threads": threads, "streams": streams}
        if machine is None:
            return OpenVinoRunner(str(model_path), **compile_as)
        return _compiled_openvino(model_path, machine, **compile_as)
    import onnxruntime as ort

    session = ort.InferenceSession(
        str(model_path), onnx_session_options(threads), providers=["CPUExecutionProvider"]
    )
    return OnnxRunner(session)


#: OpenVINO's compiled models of an export (``CACHE_DIR`` blobs), beside its files.
COMPILED_DIR = "compiled"
#: A private compile folder older than this was left by a killed process.
STALE_COMPILE_SECONDS = 3600


def _compiled_openvino(model_path: Path, machine: str, **compile_as) -> OpenVinoRunner:
    """The export compiled for this CPU, from its cached compiled model when there is one.

    A compiled model imported from OpenVINO's cache gives the same features to the bit and holds
    less: ViT-S/14 448 bf16, 2 threads (Intel Xeon, AMX): 37 MB less anonymous memory (the fp32
    IR is not read), 0.08 s instead of 0.3 to compile. OpenVINO writes its cache in place, so it
    works in a private folder holding links to the shared blobs; the blobs it adds are renamed
    into the shared folder (whole or not at all, whichever process is first). Where the cache
    cannot be kept (a read-only folder, no hard links) the export is compiled without it.
    ``compile_as``: ``OpenVinoRunner``'s precision, threads and streams."""
    try:
        return _compile_through_cache(model_path, machine, **compile_as)
    except OSError as exc:
        log.warning("OpenVINO compiles %s without its cache: %s", model_path, exc)
        return OpenVinoRunner(str(model_path), **compile_as)


def _compile_through_cache(model_path: Path, machine: str, **compile_as) -> OpenVinoRunner:
    folder = model_path.parent
    _remove_stale_compiles(folder)
    shared = folder / COMPILED_DIR / machine
    shared.mkdir(parents=True, exist_ok=True)
    private = Path(tempfile.mkdtemp(prefix=".compiling-", dir=folder))
    try:
        for blob in shared.iterdir():
            os.link(blob, private / blob.name)
        runner = OpenVinoRunner(str(model_path), cache_dir=str(private), **compile_as)
        for blob in private.iterdir():
            if blob.stat().st_nlink == 1:  # written by this compile
                os.replace(blob, shared / blob.name)
        return runner
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _remove_stale_compiles(folder: Path) -> None:
    now = time.time()
    for leftover in folder.glob(".compiling-*"):
        if now - leftover.stat().st_mtime > STALE_COMPILE_SECONDS:
            shutil.rmtree(leftover, ignore_errors=True)
