"""What every scoring task of one run shares: the run context, the model check, the report row.

Every image gives exactly one ``ReportRow``; an image that cannot be read or decoded gives a row
with its ``error`` and never stops the others. The verdict comes from the core's rule
(``anomalydino_core.verdicts``), the peak location from ``anomalydino_core.overlays``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prefect.cache_policies import NO_CACHE

from anomalydino_core.config import ModelSettings
from anomalydino_core.overlays import peak_pixel
from anomalydino_core.verdicts import verdict_of
from tasks.embed import EmbeddedSource, SourceImage
from tasks.embedding_store import EmbeddingStore, image_key
from tasks.layout import overlay_name
from tasks.models import Embedder, embedder
from tasks.report import ReportRow
from tasks.retry import TASK_RETRY_OPTIONS
from tasks.storage import StorageConfig, join

FEW_SHOT = "few_shot"
ZERO_SHOT = "zero_shot"

# scoring tasks are retried on storage errors (tasks.retry) and never cached: a re-run re-checks
TASK_OPTIONS: dict[str, Any] = dict(**TASK_RETRY_OPTIONS, cache_policy=NO_CACHE)


class ModelMismatchError(RuntimeError):
    """This process would embed with other settings than the run (e.g. other weights)."""


@dataclass(frozen=True)
class PreviousOverlays:
    """The overlays of the lot's previous run, for reuse: an overlay is copied instead of
    rendered when the image has the same content hash, the overlay scale is the same and the
    new anomaly map equals the previous run's stored map exactly (then the JPEG is identical; an
    older run's PNG overlay is rendered anew).
    Maps are compared by the ``map_sha256`` stored with them (by value for older archives);
    on S3 the copy is server-side."""

    maps_uri: str
    scale: tuple[float, float]
    overlays: dict[str, tuple[str, str]]  # image id -> (content sha256, overlay uri)
    thumbs_uri: str = ""  # the previous run's thumbnails (tasks.thumbnails)


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
    # FoundAD (scorer foundad or both): with foundad, threshold/threshold_source above are
    # FoundAD's and it makes the verdict; with both, the kNN decides and FoundAD's score,
    # threshold and verdict stand beside it
    scorer: str = "knn"
    projector_uri: str | None = None
    foundad_threshold: float | None = None
    foundad_threshold_source: str | None = None
    token_store_uri: str | None = None
    token_settings: dict[str, Any] | None = None
    foundad_maps_uri: str | None = None  # scorer both: FoundAD's maps beside the kNN's

    @property
    def uses_knn(self) -> bool:
        return self.scorer in ("knn", "both")

    @property
    def uses_foundad(self) -> bool:
        return self.scorer in ("foundad", "both")

    def foundad_map_uri(self, image_id: str) -> str | None:
        if self.foundad_maps_uri is None:
            return None
        return join(self.foundad_maps_uri, "maps", image_key(image_id))

    def map_uri(self, image_id: str) -> str:
        return join(self.maps_uri, "maps", image_key(image_id))

    def overlay_uri(self, image_id: str) -> str:
        return join(self.overlays_uri, overlay_name(image_id))

    @property
    def thumbs_uri(self) -> str:
        """The run's thumbnails of flagged images (``tasks.thumbnails``), beside its overlays."""
        return join(self.overlays_uri.rstrip("/").rsplit("/", 1)[0], "thumbs")


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
    foundad_score: float | None = None,
) -> ReportRow:
    """One image's row; ``score`` is the deciding scorer's (FoundAD's with scorer foundad),
    ``foundad_score`` FoundAD's whenever it ran (the same value with scorer foundad)."""
    s = ctx.store_settings
    thr = ctx.threshold if threshold_source is None else threshold
    verdict, flagged = verdict_of(score, thr)
    foundad_verdict = None
    if ctx.uses_foundad:
        foundad_verdict = verdict_of(foundad_score, ctx.foundad_threshold)[0]
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
        scorer=ctx.scorer,
        foundad_score=None if foundad_score is None else float(foundad_score),
        foundad_threshold=ctx.foundad_threshold if ctx.uses_foundad else None,
        foundad_threshold_source=ctx.foundad_threshold_source if ctx.uses_foundad else None,
        foundad_verdict=foundad_verdict,
        foundad_map_uri=ctx.foundad_map_uri(item.image_id) if foundad_score is not None else None,
        projector_uri=ctx.projector_uri,
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


def run_model(ctx: RunContext, storage: StorageConfig) -> Embedder:
    """This process's model, checked to embed exactly as the run's store records."""
    model = embedder(ctx.model, storage)
    if model.settings != ctx.store_settings:
        raise ModelMismatchError(
            f"this worker's model settings differ from the run's ({model.key} != "
            f"store {ctx.store_uri}): same weights and software on every worker, please"
        )
    return model


def open_store(ctx: RunContext, storage: StorageConfig) -> EmbeddingStore:
    return EmbeddingStore.open(ctx.store_uri, ctx.store_settings, storage)


def open_token_store(ctx: RunContext, storage: StorageConfig) -> EmbeddingStore | None:
    """FoundAD's token store of the run (None when FoundAD does not score it)."""
    if not ctx.uses_foundad:
        return None
    return EmbeddingStore.open(ctx.token_store_uri, ctx.token_settings, storage)
