"""Zarr v3 store of patch embeddings for one (product, backbone identity, preprocessing config).

Layout at the store URI::

    zarr.json                 attributes {"anomalydino": {"kind", "format_version", "settings"}}
    images/zarr.json
    images/<sha256(image_id)>/zarr.json    image_id, source_uri, content_sha256, image_size,
                                           grid, feature_dim, has_mask, complete
    images/<key>/features     (gh, gw, C) float16, one chunk, blosc-zstd level 1, byte shuffle
    images/<key>/mask         (gh, gw) bool, one chunk (absent when the image has no mask:
                              embedded while masking was off; ``foreground`` computes it)

``settings`` (backbone, weights hash, resolution, ...) is fixed when the store is created;
opening it with other settings raises :class:`StoreSettingsError`, so embeddings of different
models or preprocessing never mix. An image is visible only once ``complete: true`` is written to
its group, which happens last (one atomic object write); the group is written first with
``complete: false``, so a run killed halfway leaves an incomplete group (never arrays without
their group, which zarr warns about) that readers ignore and the next ``put`` overwrites.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.errors import ContainsGroupError, GroupNotFoundError, NodeNotFoundError

from anomalydino_core.float16 import float16_checked, to_float32
from anomalydino_core.masking import foreground_mask
from tasks import zarr_nodes
from tasks.storage import StorageConfig, is_local, zarr_store

FORMAT_VERSION = 1
EMBEDDING_STORE_KIND = "embedding_store"
_META = "anomalydino"
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
NOT_FOUND_ERRORS = (GroupNotFoundError, NodeNotFoundError, FileNotFoundError, KeyError)
_REPAIRED: set[str] = set()  # local stores repaired by this process


def complete_ids(store: Any, path: str, *, groups: bool) -> list[str]:
    """Sorted ``image_id`` of the complete entries (groups or arrays) under ``path``."""
    try:
        parent = zarr.open_group(store, path=path, mode="r", zarr_format=3)
    except NOT_FOUND_ERRORS:
        return []
    with warnings.catch_warnings():  # entries being written have no metadata yet
        warnings.filterwarnings("ignore", "Object at .* is not recognized", UserWarning)
        nodes = list(parent.groups() if groups else parent.arrays())
    return sorted(
        node.attrs["image_id"]
        for _, node in nodes
        if node.attrs.get("complete") is True and isinstance(node.attrs.get("image_id"), str)
    )


class StoreSettingsError(ValueError):
    """A store was opened with settings (or of a kind) other than it was created with."""


def image_key(image_id: str) -> str:
    """Safe, fixed-length node name for an image id (sha256 hex of its UTF-8 bytes)."""
    return hashlib.sha256(image_id.encode("utf-8")).hexdigest()


def feature_compressor() -> BloscCodec:
    """Blosc-lz4 level 5 with bit shuffle. Float16 feature grids hardly compress; what does is
    their exponent bits, which bit shuffle groups. One thread, CPU ms per grid to write / read
    and ratio (Intel Xeon, AMX): ViT-S/14 448 (random weights, 32 x 32 x 384) lz4 + bit shuffle
    0.69 / 0.27 at 1.158, zstd level 1 + byte shuffle (the codec before) 1.45 / 1.19 at 1.107;
    EfficientNet-Lite0 448 on bottle images (28 x 28 x 152) 0.14 / 0.07 at 1.082 against
    0.49 / 0.39 at 1.088. Arrays written with the codec before read as they are (zarr reads
    each array's codec from its metadata)."""
    return BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")


def normalize_settings(settings: Mapping[str, Any], what: str = "settings") -> dict[str, Any]:
    """``settings`` as stored in zarr attributes (JSON round trip: tuples become lists)."""
    try:
        return json.loads(json.dumps(dict(settings), sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} must be JSON-serialisable: {exc}") from exc


def _diff(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> str:
    keys = sorted(set(stored) | set(wanted))
    parts = [
        f"{k}: stored {stored.get(k, '<missing>')!r} != requested {wanted.get(k, '<missing>')!r}"
        for k in keys
        if stored.get(k, "<missing>") != wanted.get(k, "<missing>")
    ]
    return "; ".join(parts)


def open_root(
    uri: str,
    kind: str,
    settings: Mapping[str, Any] | None,
    storage: StorageConfig | None,
    *,
    create: bool,
    read_only: bool,
    children: tuple[str, ...],
) -> tuple[Any, dict[str, Any]]:
    """Open (or create) the root group of an anomalydino zarr store and check its settings.

    Returns ``(zarr store, stored settings)``. ``settings=None`` accepts whatever is stored (and
    cannot create).
    """
    wanted = normalize_settings(settings) if settings is not None else None
    store = zarr_store(uri, storage, read_only=read_only)
    try:
        root = zarr.open_group(store, mode="r", zarr_format=3)
    except NOT_FOUND_ERRORS:
        root = None
    if root is None:
        if not create or read_only or wanted is None:
            raise FileNotFoundError(f"{uri}: no {kind} here (and not asked to create one)")
        # The root metadata (kind + settings) is one object, written first and whole. Children
        # are conveniences: writes under them create missing parents, readers treat missing
        # children as empty.
        meta = {"kind": kind, "format_version": FORMAT_VERSION, "settings": wanted}
        with contextlib.suppress(ContainsGroupError):  # created concurrently: validated below
            zarr.create_group(store, attributes={_META: meta})
        for child in children:
            with contextlib.suppress(ContainsGroupError):
                zarr.create_group(store, path=child)
        root = zarr.open_group(store, mode="r", zarr_format=3)
    meta = root.attrs.get(_META)
    if not isinstance(meta, dict) or meta.get("kind") != kind:
        found = meta.get("kind") if isinstance(meta, dict) else "no anomalydino metadata"
        raise StoreSettingsError(f"{uri}: not an anomalydino {kind} (found {found!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise StoreSettingsError(
            f"{uri}: {kind} format version {meta.get('format_version')!r}, "
            f"this code reads version {FORMAT_VERSION}"
        )
    stored = meta.get("settings") or {}
    if wanted is not None and stored != wanted:
        raise StoreSettingsError(
            f"{uri}: {kind} was created with other settings; refusing to mix. "
            f"{_diff(stored, wanted)}"
        )
    return store, stored


@dataclass(frozen=True, eq=False)
class EmbeddedImage:
    """Patch features of one image. ``features`` (gh, gw, C); ``mask`` (gh, gw) bool or None."""

    image_id: str
    source_uri: str
    content_sha256: str
    image_size: tuple[int, int]
    features: np.ndarray
    mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        who = f"image {self.image_id!r}"
        if not self.image_id:
            raise ValueError("image_id must be a non-empty string")
        if not _SHA_RE.match(self.content_sha256):
            raise ValueError(f"{who}: content_sha256 must be 64 lowercase hex characters")
        size = tuple(int(v) for v in self.image_size)
        if len(size) != 2 or min(size) <= 0:
            raise ValueError(f"{who}: image_size must be (H, W) > 0, got {self.image_size!r}")
        object.__setattr__(self, "image_size", size)
        if self.features.ndim != 3 or 0 in self.features.shape:
            raise ValueError(f"{who}: features must be (gh, gw, C), got {self.features.shape}")
        if self.mask is not None:
            if self.mask.shape != self.features.shape[:2]:
                raise ValueError(
                    f"{who}: mask shape {self.mask.shape} != grid {self.features.shape[:2]}"
                )
            if self.mask.dtype != np.bool_:
                raise ValueError(f"{who}: mask must be bool, got {self.mask.dtype}")

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.features.shape[0]), int(self.features.shape[1])


class ZarrRoot:
    """A Zarr v3 root at a URI holding one entry per image (opened with ``open_root``); the
    entries live under its child groups (``children``)."""

    children: tuple[str, ...] = ()

    def __init__(self, uri: str, store: Any, settings: dict[str, Any], read_only: bool) -> None:
        self.uri = uri
        self._store = store
        self.settings = settings
        self.read_only = read_only
        self._children_checked = False

    def _ensure_children(self) -> None:
        """Create the child groups if missing (a run killed while creating the store), once
        per handle: entries are written object by object, without zarr creating parents."""
        if self._children_checked:
            return
        for child in self.children:
            if not zarr_nodes.exists(self._store, f"{child}/zarr.json"):
                with contextlib.suppress(ContainsGroupError):
                    zarr.create_group(self._store, path=child)
        self._children_checked = True

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r}, read_only={self.read_only})"


class EmbeddingStore(ZarrRoot):
    """Embeddings of one (product, backbone, preprocessing) at a URI; see module docstring."""

    children = ("images",)

    @classmethod
    def open(
        cls,
        uri: str,
        settings: Mapping[str, Any] | None,
        storage: StorageConfig | None = None,
        create: bool = True,
        read_only: bool = False,
    ) -> EmbeddingStore:
        """Open the store at ``uri``, creating it with ``settings`` if missing and ``create``.

        Raises :class:`StoreSettingsError` if it exists with other settings, and
        ``FileNotFoundError`` if it is missing and cannot be created. ``settings=None`` opens an
        existing store whatever its settings (for inspection).
        """
        store, stored = open_root(
            uri,
            EMBEDDING_STORE_KIND,
            settings,
            storage,
            create=create,
            read_only=read_only,
            children=cls.children,
        )
        handle = cls(uri, store, stored, read_only)
        if not read_only and is_local(uri) and uri not in _REPAIRED:
            _REPAIRED.add(uri)
            handle.repair()
        return handle

    def _path(self, image_id: str) -> str:
        return f"images/{image_key(image_id)}"

    def _complete_attrs(self, image_id: str) -> dict[str, Any] | None:
        try:
            group = zarr.open_group(self._store, path=self._path(image_id), mode="r", zarr_format=3)
        except NOT_FOUND_ERRORS:
            return None
        attrs = dict(group.attrs)
        if attrs.get("complete") is not True or attrs.get("image_id") != image_id:
            return None
        return attrs

    def has(self, image_id: str, content_sha256: str | None = None) -> bool:
        """True if ``image_id`` is complete (and, if given, has this content hash)."""
        attrs = self._complete_attrs(image_id)
        if attrs is None:
            return False
        return content_sha256 is None or attrs.get("content_sha256") == content_sha256

    def put(self, item: EmbeddedImage) -> None:
        """Write ``item`` (features cast to float16), replacing any previous or partial entry.

        The image becomes visible only when its ``complete`` flag is written, last.
        """
        if self.read_only:
            raise PermissionError(f"{self.uri}: opened read-only, cannot put {item.image_id!r}")
        feats, finite = float16_checked(item.features)
        if not finite:
            raise ValueError(
                f"{self.uri}: image {item.image_id!r}: features not finite in float16 "
                "(NaN/inf or |value| > 65504)"
            )
        gh, gw, dim = feats.shape
        attrs: dict[str, Any] = {
            "image_id": item.image_id,
            "source_uri": item.source_uri,
            "content_sha256": item.content_sha256,
            "image_size": list(item.image_size),
            "grid": [gh, gw],
            "feature_dim": dim,
            "has_mask": item.mask is not None,
            "complete": False,
        }
        path = self._path(item.image_id)
        chunk, meta = zarr_nodes.array_files(
            f"{path}/features", feats, compressor=feature_compressor()
        )
        if item.mask is not None:
            mask = np.ascontiguousarray(item.mask, dtype=np.bool_)
            mask_chunk, mask_meta = zarr_nodes.array_files(f"{path}/mask", mask)
            chunk.update(mask_chunk)
            meta.update(mask_meta)
        # the group first (incomplete), so no entry ever exists without its metadata; the
        # arrays; then the flag. A failure removes what was written (best effort).
        steps = [
            zarr_nodes.group_files(path, attrs),
            {**chunk, **meta},
            zarr_nodes.group_files(path, {**attrs, "complete": True}),
        ]
        try:
            self._ensure_children()
            zarr_nodes.write_steps(self._store, steps)
        except Exception as exc:
            zarr_nodes.remove_quietly(self._store, path)
            raise OSError(f"{self.uri}: writing image {item.image_id!r} failed: {exc}") from exc

    def repair(self) -> list[str]:
        """Remove the entries left without their group metadata (by a write that failed or was
        killed halfway, or by versions that wrote the group last): zarr warns about each on
        every listing, and readers ignore them anyway (their images are embedded again).
        Returns the node names removed. Done by every writable ``open`` of a local store (once
        per process); on S3 it costs a listing and a request per entry, so only on demand."""
        broken = zarr_nodes.without_metadata(self._store, "images")
        for name in broken:
            zarr_nodes.remove_quietly(self._store, f"images/{name}")
        return broken

    def attributes(self, image_id: str) -> dict[str, Any]:
        """Stored attributes of a complete entry (no array read); ``KeyError`` if absent."""
        attrs = self._complete_attrs(image_id)
        if attrs is None:
            raise KeyError(f"{self.uri}: no complete embedding for image {image_id!r}")
        return attrs

    def get(self, image_id: str) -> EmbeddedImage:
        """The complete entry of ``image_id``; ``KeyError`` naming it if absent or incomplete.

        The group and its arrays are read in one concurrent batch (one round trip on S3).
        """
        path = self._path(image_id)
        group, *arrays = zarr_nodes.read_objects(
            self._store,
            [
                f"{path}/zarr.json",
                f"{path}/features/zarr.json",
                f"{path}/features/{zarr_nodes.chunk_key(3)}",
                f"{path}/mask/zarr.json",
                f"{path}/mask/{zarr_nodes.chunk_key(2)}",
            ],
        )
        attrs = json.loads(group).get("attributes", {}) if group else {}
        if attrs.get("complete") is not True or attrs.get("image_id") != image_id:
            raise KeyError(f"{self.uri}: no complete embedding for image {image_id!r}")
        what = f"{self.uri}: image {image_id!r}"
        if arrays[0] is None or (attrs.get("has_mask") and arrays[2] is None):
            raise KeyError(f"{what}: complete but an array is missing (store damaged?)")
        features = zarr_nodes.decode_array(arrays[0], arrays[1], f"{what} features")
        mask = None
        if attrs.get("has_mask"):
            mask = zarr_nodes.decode_array(arrays[2], arrays[3], f"{what} mask").astype(np.bool_)
        if features.shape != (*attrs["grid"], attrs["feature_dim"]):
            raise KeyError(f"{what}: features {features.shape} do not match the entry (replaced?)")
        return EmbeddedImage(
            image_id=image_id,
            source_uri=attrs["source_uri"],
            content_sha256=attrs["content_sha256"],
            image_size=tuple(attrs["image_size"]),
            features=features,
            mask=mask,
        )

    def foreground(self, entry: EmbeddedImage) -> np.ndarray:
        """``entry``'s foreground mask: the stored one, else the same rule applied to its stored
        features (a stored mask is computed from exactly those float16 features, at this
        store's ``mask_threshold``): images embedded while their product's masking was off
        are stored without one."""
        if entry.mask is not None:
            return entry.mask
        threshold = float(self.settings["mask_threshold"])
        return foreground_mask(to_float32(entry.features), threshold=threshold)

    def ids(self) -> list[str]:
        """Sorted ids of all complete images."""
        return complete_ids(self._store, "images", groups=True)

    def __len__(self) -> int:
        return len(self.ids())
