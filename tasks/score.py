"""Scoring tasks: few-shot chunks of a lot (embed + score + maps + overlays), zero-shot query
blocks of a shipment, and overlays rendered after the fact.

Every image gives exactly one ``ReportRow``; an image that cannot be read or decoded gives a row
with its ``error`` and never stops the others.

Overlays: image + JET colour map on one scale for the whole lot, ``[0, 2 * threshold]`` (the
threshold sits mid-scale; anything twice as far from the references as the threshold is full
red), or ``[0, max of the lot's maps]`` when there is no threshold.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from anomalydino_core.config import ModelSettings
from anomalydino_core.few_shot import ScoreResult
from anomalydino_core.half import to_float32
from anomalydino_core.images import ImageDecodeError
from anomalydino_core.zero_shot import LazyFeatureSource, MutualScoringConfig, score_mutual
from tasks.bank import BankManifest, load_scorer
from tasks.embed import EmbeddedSource, SourceImage, embed_sources, load_image
from tasks.embedding_store import EmbeddedImage, EmbeddingStore, image_key
from tasks.layout import overlay_name
from tasks.map_archive import MapArchive, write_overlay_png
from tasks.models import Embedder, compute_lock, embedder, pin_threads
from tasks.report import ReportRow, verdict_of
from tasks.retry import TASK_RETRY_OPTIONS, run_logger, with_storage_retries
from tasks.storage import PERMANENT_ERRORS, StorageConfig, copy_object, join

FEW_SHOT = "few_shot"
ZERO_SHOT = "zero_shot"

_TASK_OPTIONS: dict[str, Any] = dict(
    **TASK_RETRY_OPTIONS,
    cache_policy=NO_CACHE,
)


class ModelMismatchError(RuntimeError):
    """This process would embed with other settings than the run (e.g. other weights)."""


@dataclass(frozen=True)
class PreviousOverlays:
    """The overlays of the lot's previous run, for reuse: an overlay is copied instead of
    rendered when the image has the same content hash, the overlay scale is the same and the
    new anomaly map equals the previous run's stored map exactly (then the PNG is identical).
    Maps are compared by the ``map_sha256`` stored with them (by value for older archives);
    on S3 the copy is server-side."""

    maps_uri: str
    scale: tuple[float, float]
    overlays: dict[str, tuple[str, str]]  # image id -> (content sha256, overlay uri)


@dataclass(frozen=True)
class RunContext:
    """What every task of one (product, lot, run) needs; small and picklable."""

    product: str
    lot: str
    run_id: str
    flow_run_id: str | None
    method: str
    run_started_at: datetime
    store_uri: str
    store_settings: dict[str, Any]
    maps_uri: str
    overlays_uri: str
    model: ModelSettings
    storage: Any  # flows.config.StorageSettings (no secrets)
    threads: int
    io_threads: int
    threshold: float | None
    threshold_source: str
    use_mask: bool
    shots: int | None = None
    reference_version: str | None = None
    bank_uri: str | None = None
    previous: PreviousOverlays | None = None

    def map_uri(self, image_id: str) -> str:
        return join(self.maps_uri, "maps", image_key(image_id))

    def overlay_uri(self, image_id: str) -> str:
        return join(self.overlays_uri, overlay_name(image_id))


def overlay_scale(threshold: float | None, lot_max: float) -> tuple[float, float]:
    """The one colour scale of a lot's overlays (see the module docstring)."""
    vmax = 2.0 * threshold if threshold else lot_max
    return 0.0, float(vmax) if vmax > 0 else 1.0


def peak_pixel(max_patch: tuple[int, int], grid: tuple[int, int], size: tuple[int, int]):
    """Centre (y, x) in original pixels of patch (row, col) of an aligned grid over the image."""
    (row, col), (gh, gw), (h, w) = max_patch, grid, size
    return int((row + 0.5) * h / gh), int((col + 0.5) * w / gw)


def make_row(
    ctx: RunContext,
    item: SourceImage,
    *,
    content_sha256: str | None,
    file_size: int | None,
    image_size: tuple[int, int] | None,
    reused: bool | None,
    score: float | None = None,
    masked_fraction: float | None = None,
    max_patch: tuple[int, int] | None = None,
    grid: tuple[int, int] | None = None,
    map_uri: str | None = None,
    overlay_uri: str | None = None,
    error: str | None = None,
    threshold: float | None = None,
    threshold_source: str | None = None,
) -> ReportRow:
    s = ctx.store_settings
    thr = ctx.threshold if threshold_source is None else threshold
    verdict, flagged = verdict_of(score, thr)
    peak = (None, None)
    if max_patch is not None and grid is not None and image_size is not None:
        peak = peak_pixel(max_patch, grid, image_size)
    return ReportRow(
        product=ctx.product,
        lot=ctx.lot,
        run_id=ctx.run_id,
        flow_run_id=ctx.flow_run_id,
        method=ctx.method,
        image_id=item.image_id,
        image_uri=item.uri,
        content_sha256=content_sha256,
        file_size_bytes=file_size,
        image_height=None if image_size is None else int(image_size[0]),
        image_width=None if image_size is None else int(image_size[1]),
        score=None if score is None else float(score),
        threshold=thr,
        threshold_source=threshold_source or ctx.threshold_source,
        verdict=verdict,
        is_anomalous=flagged,
        backbone=s["backbone"],
        weights_sha256=s["weights_sha256"],
        resolution=int(s["preprocess"]["resolution"]),
        precision=s["precision"],
        shots=ctx.shots,
        reference_version=ctx.reference_version,
        bank_uri=ctx.bank_uri,
        masking=ctx.use_mask,
        masked_fraction=masked_fraction,
        max_patch_row=None if max_patch is None else int(max_patch[0]),
        max_patch_col=None if max_patch is None else int(max_patch[1]),
        max_patch_y=peak[0],
        max_patch_x=peak[1],
        map_uri=map_uri,
        overlay_uri=overlay_uri if flagged else None,
        embedding_reused=reused,
        run_started_at=ctx.run_started_at,
        scored_at=datetime.now(UTC) if score is not None else None,
        error=error,
    )


def error_row(ctx: RunContext, res: EmbeddedSource) -> ReportRow:
    return make_row(
        ctx,
        res.item,
        content_sha256=res.content_sha256,
        file_size=res.file_size,
        image_size=res.image_size,
        reused=None,
        error=res.error,
    )


def _run_model(ctx: RunContext, storage: StorageConfig) -> Embedder:
    """This process's model, checked to embed exactly as the run's store records."""
    model = embedder(ctx.model, storage)
    if model.settings != ctx.store_settings:
        raise ModelMismatchError(
            f"this worker's model settings differ from the run's ({model.key} != "
            f"store {ctx.store_uri}): same weights and software on every worker, please"
        )
    return model


def _open_store(ctx: RunContext, storage: StorageConfig) -> EmbeddingStore:
    return EmbeddingStore.open(ctx.store_uri, ctx.store_settings, storage)


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
        lambda: write_overlay_png(target, image, amap, scale[0], scale[1], storage),
        what=f"write {target}",
    )


def _put_map(archive: MapArchive, image_id: str, uri: str, amap: np.ndarray, score: float) -> None:
    with_storage_retries(
        lambda: archive.put(image_id, amap, source_uri=uri, attributes={"score": score}),
        what=f"write map of {image_id}",
    )


def _record(
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
) -> ReportRow:
    """The report row of a scored image, its map written and, if flagged, its overlay (the
    row keeps no overlay URI when the source image is gone)."""
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
    )
    _put_map(archive, item.image_id, item.uri, result.anomaly_map, row.score)
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
    return True


# ------------------------------------------------------------------------- few-shot (audit)


@task(name="score-images", **_TASK_OPTIONS)
def score_images(
    items: list[SourceImage], ctx: RunContext, manifest: BankManifest
) -> list[ReportRow]:
    """Embed (or reuse) a chunk of a lot, score it against the bank, write maps and overlays.

    Phases, each with the cores to itself: embedding; one bank search for the whole chunk
    (``compute_lock()``); then maps, image scores, map and overlay writes in the I/O pool.
    """
    t0 = time.perf_counter()
    storage = ctx.storage.storage_config()
    store = _open_store(ctx, storage)
    scorer = load_scorer(manifest, storage)
    archive = MapArchive.open(ctx.maps_uri, None, storage, create=False)

    def finish(res: EmbeddedSource, patch: np.ndarray) -> ReportRow:
        fg = res.masks[0] if ctx.use_mask else None
        row = _record(
            ctx,
            res.item,
            scorer.result(patch, image_size=res.image_size, foreground=fg),
            archive=archive,
            storage=storage,
            content_sha256=res.content_sha256,
            file_size=res.file_size,
            image_size=res.image_size,
            reused=res.reused,
            image=res.image,
        )
        res.image = None
        return row

    with ThreadPoolExecutor(ctx.io_threads, thread_name_prefix="score-io") as pool:
        results = embed_sources(
            items,
            store,
            functools.partial(_run_model, ctx, storage),  # loaded only if an image needs it
            threads=ctx.threads,
            pool=pool,
            storage=storage,
            keep_images=True,
            max_pixels=ctx.model.decode_max_pixels,
        )
        t_embedded = time.perf_counter()
        ok = [res for res in results if res.ok]
        with compute_lock():
            patches = scorer.patch_distances(
                [res.features[0] for res in ok],
                [res.masks[0] if ctx.use_mask else None for res in ok],
            )
        for res in ok:
            res.features = []
        t_searched = time.perf_counter()
        finished = {
            id(res): pool.submit(finish, res, patch) for res, patch in zip(ok, patches, strict=True)
        }
        rows = [finished[id(res)].result() if res.ok else error_row(ctx, res) for res in results]
    t_end = time.perf_counter()
    run_logger().info(
        "scored %d images (%d reused embeddings, %d errors) in %.1fs: embed %.1fs, bank search "
        "%.1fs, maps and their writes %.1fs",
        len(rows),
        sum(1 for r in rows if r.embedding_reused),
        sum(1 for r in rows if r.error),
        t_end - t0,
        t_embedded - t0,
        t_searched - t_embedded,
        t_end - t_searched,
    )
    return rows


# ---------------------------------------------------------------------- scoring stored lots


@task(name="rescore-stored", **_TASK_OPTIONS)
def rescore_stored(
    items: list[SourceImage],
    expected_sha256: list[str | None],
    ctx: RunContext,
    manifest: BankManifest,
) -> list[ReportRow]:
    """Re-score images from their stored embeddings only (never re-embeds): re-evaluation."""
    storage = ctx.storage.storage_config()
    store = _open_store(ctx, storage)
    pin_threads(ctx.threads)
    scorer = load_scorer(manifest, storage)
    archive = MapArchive.open(ctx.maps_uri, None, storage, create=False)

    def load(item: SourceImage, sha: str | None):
        if sha is None:
            return None, "no stored embedding: the image was unreadable when the lot was audited"
        if not store.has(item.store_id, sha):
            return None, (
                f"no stored embedding with content sha256 {sha[:12]}... for these model settings"
            )
        return store.get(item.store_id), None

    def finish(item: SourceImage, entry: EmbeddedImage, patch: np.ndarray) -> ReportRow:
        fg = entry.mask if ctx.use_mask else None
        return _record(
            ctx,
            item,
            scorer.result(patch, image_size=entry.image_size, foreground=fg),
            archive=archive,
            storage=storage,
            content_sha256=entry.content_sha256,
            file_size=None,
            image_size=entry.image_size,
            reused=True,
        )

    with ThreadPoolExecutor(ctx.io_threads, thread_name_prefix="rescore-io") as pool:
        loaded = list(pool.map(load, items, expected_sha256))
        found = [(item, entry) for item, (entry, _) in zip(items, loaded, strict=True) if entry]
        with compute_lock():
            patches = scorer.patch_distances(
                [to_float32(entry.features) for _, entry in found],
                [entry.mask if ctx.use_mask else None for _, entry in found],
            )
        finished = {
            id(entry): pool.submit(finish, item, entry, patch)
            for (item, entry), patch in zip(found, patches, strict=True)
        }
        rows = []
        for item, sha, (entry, error) in zip(items, expected_sha256, loaded, strict=True):
            if entry is not None:
                rows.append(finished[id(entry)].result())
                continue
            rows.append(
                make_row(
                    ctx,
                    item,
                    content_sha256=sha,
                    file_size=None,
                    image_size=None,
                    reused=None,
                    error=f"{item.image_id}: {error}",
                )
            )
    return rows


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


# --------------------------------------------------------------------- zero-shot (screening)


@dataclass(frozen=True)
class StoredImage:
    """An embedded image of a shipment, as the zero-shot blocks need it."""

    item: SourceImage
    content_sha256: str
    file_size: int
    image_size: tuple[int, int]
    grid: tuple[int, int]


@dataclass(frozen=True)
class ZeroShotScore:
    index: int
    score: float
    masked_fraction: float | None
    max_patch: tuple[int, int]
    map_max: float


@task(name="score-zero-shot-block", **_TASK_OPTIONS)
def score_zero_shot_block(
    query: list[int],
    images: list[StoredImage],
    ctx: RunContext,
    config: MutualScoringConfig,
) -> list[ZeroShotScore]:
    """Score the ``query`` images against all the others of the shipment (METHOD.md s. 4)."""
    t0 = time.perf_counter()
    pin_threads(ctx.threads)
    storage = ctx.storage.storage_config()
    store = _open_store(ctx, storage)
    archive = MapArchive.open(ctx.maps_uri, None, storage, create=False)
    ids = [im.item.store_id for im in images]

    def loader(i: int) -> np.ndarray:
        return to_float32(
            with_storage_retries(
                lambda: store.get(ids[i]).features, what=f"read embedding {ids[i]}"
            )
        )

    masks: list[np.ndarray | None] = [None] * len(images)
    if ctx.use_mask:
        with ThreadPoolExecutor(ctx.io_threads) as pool:
            for i, m in zip(query, pool.map(lambda i: store.get(ids[i]).mask, query), strict=True):
                masks[i] = m
    source = LazyFeatureSource([im.grid for im in images], loader)
    with compute_lock():
        results = score_mutual(
            source,
            query_indices=query,
            masks=masks if ctx.use_mask else None,
            image_sizes=[im.image_size for im in images],
            config=config,
        )
    out: list[ZeroShotScore] = []
    with ThreadPoolExecutor(ctx.io_threads, thread_name_prefix="zs-io") as pool:
        writes = []
        for r in results:
            im = images[r.index]
            fg = masks[r.index]
            writes.append(
                pool.submit(
                    _put_map, archive, im.item.image_id, im.item.uri, r.anomaly_map, r.score
                )
            )
            out.append(
                ZeroShotScore(
                    index=r.index,
                    score=float(r.score),
                    masked_fraction=None if fg is None else float(1.0 - fg.mean()),
                    max_patch=r.max_patch,
                    map_max=float(r.anomaly_map.max()),
                )
            )
        for fut in writes:
            fut.result()
    run_logger().info("zero-shot block of %d images in %.1fs", len(query), time.perf_counter() - t0)
    return out


# ------------------------------------------------------------------ overlays after the fact


@task(name="write-overlays", **_TASK_OPTIONS)
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
