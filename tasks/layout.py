"""The storage layout of the pipeline: where every kind of object lives under the root URI.

::

    <root>/
      incoming/<product>/<lot>/**/<image>          lots to audit / shipments to screen
      references/<product>/<version>/**/<image>    reference sets, one folder per version
      embeddings/<product>/<feature_key>.zarr      patch embeddings (Zarr v3), per model settings
      banks/<product>/<version>/<bank_key>/        index.faiss + bank.json (written last)
      reports/<product>/<lot>/<run_id>.parquet     one report per (product, lot, run)
      maps/<product>/<lot>/<run_id>/anomaly_maps.zarr   float16 maps at the original resolution
      maps/<product>/<lot>/<run_id>/overlays/**    PNG overlays of the flagged images
      changes/<product>/<version>/<run_id>.parquet verdict changes after a reference update

``incoming`` and ``references`` may live elsewhere (``PipelineConfig.incoming`` /
``.references``). Names of products, lots and versions are single path components.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from tasks.storage import join

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_NATURAL_RE = re.compile(r"(\d+)")


def check_name(kind: str, name: str) -> str:
    """``name`` if it is a safe single path component (letters, digits, ``._-``), else raise."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"{kind} name {name!r}: use letters, digits, '.', '_' and '-' only "
            "(starting with a letter or digit, at most 128 characters)"
        )
    return name


def valid_names(kind: str, names: Iterable[str], warn: Callable[..., Any]) -> list[str]:
    """The ``names`` (folders found in storage) that are valid ``kind`` names; each other one is
    skipped with a warning through ``warn`` (a logger's ``warning``)."""
    out = []
    for name in names:
        try:
            check_name(kind, name)
        except ValueError as exc:
            warn("skipping %s folder %r: %s", kind, name, exc)
            continue
        out.append(name)
    return out


def natural_key(name: str) -> tuple:
    """Sort key with numbers compared as numbers: v2 < v10, 2024-05-01 < 2024-12-01."""
    return tuple(int(p) if p.isdigit() else p for p in _NATURAL_RE.split(name))


def latest_version(versions: list[str]) -> str | None:
    """The newest reference version: the greatest name in natural order."""
    return max(versions, key=natural_key) if versions else None


def relative_id(prefix: str, uri: str) -> str:
    """Image id of ``uri`` inside ``prefix``: its relative path with ``/`` separators."""
    base = prefix.rstrip("/") + "/"
    if not uri.startswith(base):
        raise ValueError(f"{uri} is not under {prefix}")
    return uri[len(base) :]


@dataclass(frozen=True)
class Layout:
    """URIs of everything the pipeline reads and writes (see the module docstring)."""

    root: str
    incoming_root: str
    references_root: str

    @classmethod
    def at(cls, root: str, incoming: str | None = None, references: str | None = None) -> Layout:
        return cls(root, incoming or join(root, "incoming"), references or join(root, "references"))

    def product_incoming(self, product: str) -> str:
        return join(self.incoming_root, check_name("product", product))

    def lot(self, product: str, lot: str) -> str:
        return join(self.product_incoming(product), check_name("lot", lot))

    def product_references(self, product: str) -> str:
        return join(self.references_root, check_name("product", product))

    def reference_version(self, product: str, version: str) -> str:
        return join(self.product_references(product), check_name("version", version))

    def embeddings(self, product: str, feature_key: str) -> str:
        return join(self.root, "embeddings", check_name("product", product), f"{feature_key}.zarr")

    def bank(self, product: str, version: str, bank_key: str) -> str:
        return join(
            self.root,
            "banks",
            check_name("product", product),
            check_name("version", version),
            bank_key,
        )

    def product_reports(self, product: str) -> str:
        return join(self.root, "reports", check_name("product", product))

    def lot_reports(self, product: str, lot: str) -> str:
        return join(self.product_reports(product), check_name("lot", lot))

    def report(self, product: str, lot: str, run_id: str) -> str:
        return join(self.lot_reports(product, lot), f"{run_id}.parquet")

    def run_maps(self, product: str, lot: str, run_id: str) -> str:
        return join(
            self.root, "maps", check_name("product", product), check_name("lot", lot), run_id
        )

    def map_archive(self, product: str, lot: str, run_id: str) -> str:
        return join(self.run_maps(product, lot, run_id), "anomaly_maps.zarr")

    def overlays(self, product: str, lot: str, run_id: str) -> str:
        return join(self.run_maps(product, lot, run_id), "overlays")

    def changes(self, product: str, version: str, run_id: str) -> str:
        return join(
            self.root,
            "changes",
            check_name("product", product),
            check_name("version", version),
            f"{run_id}.parquet",
        )


#: Overlays are JPEG files (``tasks/map_archive.write_overlay``).
OVERLAY_SUFFIX = ".jpg"


def overlay_name(image_id: str) -> str:
    """Overlay file path (relative) for an image id: the id with ``.jpg`` appended (``a/b.png``
    -> ``a/b.png.jpg``; one overlay per id)."""
    return f"{image_id}{OVERLAY_SUFFIX}"
