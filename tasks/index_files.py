"""A patch index as a local file pair: ``path`` (``PatchIndex.to_bytes()``) and ``path.json``
(format, kind, size, dim, nprobe), each written atomically."""

from __future__ import annotations

import json
from pathlib import Path

from anomalydino_core.memory_bank import INDEX_FORMAT, PatchIndex


def save_index(index: PatchIndex, path: str | Path) -> None:
    """Write ``path`` (``index.to_bytes()``) and ``path.json`` (metadata) atomically."""
    path = Path(path)
    raw = index.to_bytes()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(raw)
    meta = {
        "format": INDEX_FORMAT,
        "kind": index.kind,
        "size": index.size,
        "dim": index.dim,
        "nprobe": index.nprobe,
    }
    tmp_meta = path.with_name(path.name + ".json.tmp")
    tmp_meta.write_text(json.dumps(meta))
    tmp.replace(path)
    tmp_meta.replace(path.with_name(path.name + ".json"))


def load_index(path: str | Path, *, use_gpu: bool | None = None) -> PatchIndex:
    """The index written by ``save_index``; a truncated or mismatched file is an error."""
    path = Path(path)
    meta = json.loads(path.with_name(path.name + ".json").read_text())
    if meta.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path}: not a patch index (format {meta.get('format')!r})")
    obj = PatchIndex.from_bytes(
        path.read_bytes(),
        meta["kind"],
        use_gpu=use_gpu,
        nprobe=meta.get("nprobe", 16),
        dim=meta["dim"],
    )
    if obj.size != meta["size"] or obj.dim != meta["dim"]:
        raise ValueError(f"{path}: index does not match its metadata (truncated file?)")
    return obj
