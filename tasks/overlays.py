"""Anomaly maps and overlays of a run, written with retries: a flagged image's overlay is
rendered (``anomalydino_core.overlays``, the lot's one colour scale), or copied from the lot's
previous run when provably identical, or skipped with a warning when the source image is gone.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
from prefect import task

from anomalydino_core.few_shot import ScoreResult
from anomalydino_core.images import ImageDecodeError
from anomalydino_core.overlays import overlay_scale
from tasks.embed import SourceImage, load_image
from tasks.layout import OVERLAY_SUFFIX
from tasks.map_archive import MapArchive, write_overlay
from tasks.report import ReportRow
from tasks.retry import run_logger, with_storage_retries
from tasks.run_context import TASK_OPTIONS, RunContext, make_row
from tasks.storage import PERMANENT_ERRORS, StorageConfig, copy_object
from tasks.thumbnails import overlay_thumb_uri, thumb_uri, write_thumbnail


def _write_overlay(
    ctx: RunContext,
    image_id: str,
    uri: str,
    image: np.ndarray | None,
    amap: np.ndarray,
    scale: tuple[float, float],
    storage: StorageConfig,
) -> None:
    if image is None:
        image = load_image(uri, image_id, storage, ctx.model.decode_max_pixels)
    target = ctx.overlay_uri(image_id)
    with_storage_retries(
        lambda: write_overlay(target, image, amap, scale[0], scale[1], storage),
        what=f"write {target}",
    )
    _write_thumbnail(ctx, image_id, image, storage, (amap, scale))


def _write_thumbnail(
    ctx: RunContext,
    image_id: str,
    image: np.ndarray,
    storage: StorageConfig,
    overlay: tuple[np.ndarray, tuple[float, float]] | None = None,
) -> None:
    """The flagged image's thumbnails (image, and overlay given its map and scale) for the lot
    page, while it is decoded; a failure only costs the page a slower path (it decodes the
    source again, or blends the overlay from the map)."""
    try:
        with_storage_retries(
            lambda: write_thumbnail(ctx.thumbs_uri, image_id, image, storage, overlay),
            what=f"write the thumbnail of {image_id}",
        )
    except Exception as exc:
        run_logger().warning("%s: no thumbnail for the lot page (%s)", image_id, exc)


def put_map(archive: MapArchive, image_id: str, uri: str, amap: np.ndarray, score: float) -> None:
    with_storage_retries(
        lambda: archive.put(image_id, amap, source_uri=uri, attributes={"score": score}),
        what=f"write map of {image_id}",
    )


def record_scored(
    ctx: RunContext,
    item: SourceImage,
    result: ScoreResult,
    *,
    archive: MapArchive,
    storage: StorageConfig,
    content_sha256: str | None,
    file_size: int | None,
    image_size: tuple[int, int],
    reused: bool,
    image: np.ndarray | None = None,
    foundad: ScoreResult | None = None,
    foundad_archive: MapArchive | None = None,
) -> ReportRow:
    """The report row of a scored image, its map written and, if flagged, its overlay (the
    row keeps no overlay URI when the source image is gone). ``result`` is the deciding
    scorer's; ``foundad`` FoundAD's whenever it ran, its map written to ``foundad_archive``
    when it is not the deciding one (scorer both)."""
    row = make_row(
        ctx,
        item,
        content_sha256=content_sha256,
        file_size=file_size,
        image_size=image_size,
        reused=reused,
        score=result.score,
        masked_fraction=result.masked_fraction,
        max_patch=result.max_patch,
        grid=result.patch_distances.shape,
        map_uri=ctx.map_uri(item.image_id),
        overlay_uri=ctx.overlay_uri(item.image_id),
        foundad_score=None if foundad is None else foundad.score,
    )
    put_map(archive, item.image_id, item.uri, result.anomaly_map, row.score)
    if foundad is not None and foundad_archive is not None:
        put_map(foundad_archive, item.image_id, item.uri, foundad.anomaly_map, foundad.score)
    scale = overlay_scale(ctx.threshold, 0.0)
    if not row.is_anomalous or _reuse_overlay(
        ctx, item, content_sha256, result.anomaly_map, scale, storage
    ):
        return row
    if not _write_overlay_or_skip(
        ctx, item.image_id, item.uri, result.anomaly_map, scale, storage, image
    ):
        row = replace(row, overlay_uri=None)
    return row


@functools.lru_cache(maxsize=4)
def _previous_archive(maps_uri: str, storage: StorageConfig) -> MapArchive | None:
    try:
        return MapArchive.open(maps_uri, None, storage, create=False, read_only=True)
    except (FileNotFoundError, *PERMANENT_ERRORS):
        return None


def _reuse_overlay(
    ctx: RunContext,
    item: SourceImage,
    content_sha256: str | None,
    amap: np.ndarray,
    scale: tuple[float, float],
    storage: StorageConfig,
) -> bool:
    """Copy the previous run's overlay of ``item`` if it is provably the same PNG (see
    ``PreviousOverlays``); False when it cannot be reused (then the caller renders it)."""
    prev = ctx.previous
    entry = None if prev is None else prev.overlays.get(item.image_id)
    if entry is None or entry[0] != content_sha256 or tuple(prev.scale) != tuple(scale):
        return False
    if not entry[1].endswith(OVERLAY_SUFFIX):  # an older run's PNG: rendered anew as a JPEG
        return False
    archive = _previous_archive(prev.maps_uri, storage)
    if archive is None:
        return False
    try:
        same = archive.holds(item.image_id, amap)
    except (KeyError, *PERMANENT_ERRORS):
        return False
    if not same:
        return False
    target = ctx.overlay_uri(item.image_id)
    try:
        with_storage_retries(
            lambda: copy_object(entry[1], target, storage), what=f"copy {entry[1]} -> {target}"
        )
    except PERMANENT_ERRORS:
        return False
    _copy_thumbnail(prev.thumbs_uri, ctx, item.image_id, item.uri, storage)
    return True


def _copy_thumbnail(
    thumbs_uri: str, ctx: RunContext, image_id: str, image_uri: str, storage: StorageConfig
) -> None:
    """The previous run's thumbnail of the same content or, if it has none (an older run), one
    made from the decoded image, so that the next run can copy it again."""
    src, dst = thumb_uri(thumbs_uri, image_id), thumb_uri(ctx.thumbs_uri, image_id)
    try:
        if thumbs_uri:
            with_storage_retries(lambda: copy_object(src, dst, storage), what=f"copy {src}")
            # the overlay is the previous one (same map, same scale): so is its thumbnail
            osrc = overlay_thumb_uri(thumbs_uri, image_id)
            odst = overlay_thumb_uri(ctx.thumbs_uri, image_id)
            # an older run without one: the page blends it from the map
            with contextlib.suppress(Exception):
                copy_object(osrc, odst, storage)
            return
    except Exception:
        pass
    try:
        image = load_image(image_uri, image_id, storage, ctx.model.decode_max_pixels)
    except Exception:  # the page decodes the source itself, or says why it cannot
        return
    _write_thumbnail(ctx, image_id, image, storage)


def _write_overlay_or_skip(
    ctx: RunContext,
    image_id: str,
    uri: str,
    amap: np.ndarray,
    scale: tuple[float, float],
    storage: StorageConfig,
    image: np.ndarray | None = None,
) -> bool:
    """Write the overlay; False (and a warning) when the source image is gone or changed."""
    try:
        _write_overlay(ctx, image_id, uri, image, amap, scale, storage)
    except (ImageDecodeError, *PERMANENT_ERRORS) as exc:
        run_logger().warning("%s: source image unavailable, no overlay (%s)", image_id, exc)
        return False
    return True


@task(name="write-overlays", **TASK_OPTIONS)
def write_overlays(
    images: Sequence[tuple[str, str]], ctx: RunContext, scale: tuple[float, float]
) -> list[str | None]:
    """Overlays of (image id, uri) pairs from their stored maps; None where the image is gone."""
    storage = ctx.storage.storage_config()
    archive = MapArchive.open(ctx.maps_uri, None, storage, create=False, read_only=True)

    def one(pair: tuple[str, str]) -> str | None:
        image_id, uri = pair
        amap = archive.get(image_id).astype(np.float32)
        ok = _write_overlay_or_skip(ctx, image_id, uri, amap, scale, storage)
        return ctx.overlay_uri(image_id) if ok else None

    with ThreadPoolExecutor(ctx.io_threads, thread_name_prefix="overlay-io") as pool:
        return list(pool.map(one, images))
