"""Run plumbing shared by the audit, screening and re-evaluation flows: the lot's images, the
few-shot run context, the map archive, and finishing a run (report, artifact, summary)."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

from anomalydino_core.overlays import overlay_scale
from anomalydino_core.thresholds import effective_threshold
from flows import leftovers
from flows.artifacts import publish_run_artifacts
from flows.banks import ResolvedModel, list_images, run_context
from flows.config import PipelineConfig
from flows.runtime import runner_name
from tasks.bank import BankManifest
from tasks.embed import SourceImage
from tasks.layout import relative_id
from tasks.map_archive import MapArchive
from tasks.projector import ProjectorManifest
from tasks.report import ReportRow, list_reports, read_report, write_report
from tasks.report import report_metadata as read_report_metadata
from tasks.retry import run_logger
from tasks.run_context import FEW_SHOT, PreviousOverlays, RunContext


@dataclass(frozen=True)
class LotRunSummary:
    """Where the outputs of one (product, lot, run) are, and what was found."""

    product: str
    lot: str
    run_id: str
    method: str
    report_uri: str
    maps_uri: str
    overlays_uri: str
    embeddings_uri: str
    bank_uri: str | None
    reference_version: str | None
    n_images: int
    n_flagged: int
    n_errors: int
    n_reused: int
    n_computed: int
    threshold: float | None
    threshold_source: str
    seconds: float
    runner: str
    html_uri: str | None = None
    page_seconds: float | None = None

    def text(self) -> str:
        """The human summary the CLI prints."""
        thr = (
            "none" if self.threshold is None else f"{self.threshold:.4f} ({self.threshold_source})"
        )
        return "\n".join(
            [
                f"{self.method} {self.product}/{self.lot} run {self.run_id} ({self.runner})",
                f"  images {self.n_images}, flagged {self.n_flagged}, errors {self.n_errors}, "
                f"threshold {thr}",
                f"  embeddings: {self.n_computed} computed, {self.n_reused} reused"
                + (" (every embedding reused)" if self.n_computed == 0 and self.n_reused else ""),
                f"  time {self.seconds:.1f}s ({self.n_images / max(self.seconds, 1e-9):.1f} images/s)",
                f"  report      {self.report_uri}",
                f"  lot page    {self.html_uri or 'not written (see the log)'}"
                + (f" ({self.page_seconds:.2f}s)" if self.html_uri and self.page_seconds else ""),
                f"  maps        {self.maps_uri}",
                f"  overlays    {self.overlays_uri}",
                f"  embeddings  {self.embeddings_uri}",
            ]
            + ([f"  bank        {self.bank_uri}"] if self.bank_uri else [])
        )


def lot_items(cfg: PipelineConfig, product: str, lot: str) -> list[SourceImage]:
    """The lot's images, sorted by id (their path inside the lot); a symbolic link out of the
    lot is an item refused unread (an error row)."""
    prefix = cfg.layout().lot(product, lot)
    listing = list_images(prefix, cfg.storage)
    return [
        SourceImage(
            relative_id(prefix, u),
            u,
            f"lots/{lot}/{relative_id(prefix, u)}",
            refused=listing.refused.get(u),
        )
        for u in listing.uris
    ]


def summarize(
    rows: list[ReportRow],
    ctx: RunContext,
    report_uri: str,
    seconds: float,
    runner: str,
    html_uri: str | None = None,
) -> LotRunSummary:
    return LotRunSummary(
        product=ctx.product,
        lot=ctx.lot,
        run_id=ctx.run_id,
        method=ctx.method,
        report_uri=report_uri,
        maps_uri=ctx.maps_uri,
        overlays_uri=ctx.overlays_uri,
        embeddings_uri=ctx.store_uri,
        bank_uri=ctx.bank_uri,
        reference_version=ctx.reference_version,
        n_images=len(rows),
        n_flagged=sum(1 for r in rows if r.is_anomalous),
        n_errors=sum(1 for r in rows if r.error),
        n_reused=sum(1 for r in rows if r.embedding_reused and not r.error),
        n_computed=sum(1 for r in rows if r.embedding_reused is False and not r.error),
        threshold=ctx.threshold,
        threshold_source=ctx.threshold_source,
        seconds=round(seconds, 3),
        runner=runner,
        html_uri=html_uri,
    )


def report_metadata(ctx: RunContext, cfg: PipelineConfig, extra: dict[str, Any]) -> dict:
    return {
        "product": ctx.product,
        "lot": ctx.lot,
        "run_id": ctx.run_id,
        "flow_run_id": ctx.flow_run_id,
        "method": ctx.method,
        "reference_version": ctx.reference_version,
        "bank_uri": ctx.bank_uri,
        "threshold": ctx.threshold,
        "threshold_source": ctx.threshold_source,
        "embeddings_uri": ctx.store_uri,
        "maps_uri": ctx.maps_uri,
        "thumbs_uri": ctx.thumbs_uri,
        "run_started_at": ctx.run_started_at.isoformat(),
        "model": cfg.model.model_dump(mode="json"),
        "scoring": cfg.scoring_for(ctx.product).model_dump(mode="json"),
        "scorer": ctx.scorer,
        **(
            {
                "projector_uri": ctx.projector_uri,
                "foundad_threshold": ctx.foundad_threshold,
                "foundad_threshold_source": ctx.foundad_threshold_source,
                "foundad_maps_uri": ctx.foundad_maps_uri,
                "foundad": cfg.foundad.model_dump(mode="json"),
            }
            if ctx.uses_foundad
            else {}
        ),
        **extra,
    }


def bank_references(manifest: BankManifest) -> list[dict[str, str]]:
    """The references of a bank, for the report metadata (the lot page shows them)."""
    return [
        {"image_id": r.image_id, "uri": r.uri, "content_sha256": r.content_sha256}
        for r in manifest.references
    ]


def write_page(report_uri: str, cfg: PipelineConfig) -> str | None:
    """The run's HTML lot page beside its report; a failure is a warning, never the run's
    failure (the Parquet report is the record)."""
    from tasks.lot_report import write_lot_report

    try:
        return write_lot_report(report_uri, cfg.storage_config())
    except Exception as exc:
        run_logger().warning("%s: the lot page was not written (%s)", report_uri, exc)
        return None


def finish_run(
    job: str,
    ctx: RunContext,
    cfg: PipelineConfig,
    rows: list[ReportRow],
    extra: dict[str, Any],
    t0: float,
) -> LotRunSummary:
    """Write the run's report and its HTML page, publish its artifacts, log and return its
    summary. ``job`` names the run in the log."""
    report_uri = cfg.layout().report(ctx.product, ctx.lot, ctx.run_id)
    runner = runner_name(cfg.runtime)
    meta = report_metadata(
        ctx,
        cfg,
        {"runner": runner, **extra, "seconds_to_report": round(time.perf_counter() - t0, 3)},
    )
    write_report(report_uri, rows, meta, cfg.storage)
    t_page = time.perf_counter()
    html_uri = write_page(report_uri, cfg)
    page_seconds = time.perf_counter() - t_page
    summary = summarize(rows, ctx, report_uri, time.perf_counter() - t0, runner, html_uri)
    summary = replace(summary, page_seconds=round(page_seconds, 3))
    publish_run_artifacts(summary, rows, html_uri)
    run_logger().info(
        "%s %s %s/%s run %s: %d images, %d flagged, %d errors in %.1fs; report %s; page %s (%.2fs)",
        job,
        ctx.method,
        ctx.product,
        ctx.lot,
        ctx.run_id,
        summary.n_images,
        summary.n_flagged,
        summary.n_errors,
        summary.seconds,
        report_uri,
        html_uri,
        page_seconds,
    )
    return summary


def open_map_archive(ctx: RunContext, cfg: PipelineConfig, scale: tuple[float, float] | None):
    settings = {
        "product": ctx.product,
        "lot": ctx.lot,
        "run_id": ctx.run_id,
        "method": ctx.method,
        "reference_version": ctx.reference_version,
        "overlay_scale": None if scale is None else list(scale),
        "colour_map": "jet",
    }
    storage, layout = cfg.storage_config(), cfg.layout()
    run_maps = layout.run_maps(ctx.product, ctx.lot, ctx.run_id)
    report = layout.report(ctx.product, ctx.lot, ctx.run_id)
    leftovers.remove_stale_runs(
        run_maps.rsplit("/", 1)[0], layout.lot_reports(ctx.product, ctx.lot), storage
    )
    leftovers.started(ctx.flow_run_id, report, run_maps, storage)  # removed if the run fails
    if ctx.foundad_maps_uri is not None:  # scorer both: FoundAD's maps beside the kNN's
        MapArchive.open(ctx.foundad_maps_uri, dict(settings, overlay_scale=None), storage)
    return MapArchive.open(ctx.maps_uri, settings, storage)


def previous_overlays(cfg: PipelineConfig, product: str, lot: str) -> PreviousOverlays | None:
    """The overlays of the lot's latest few-shot report, offered for reuse (``_reuse_overlay``
    copies one only when the new map equals the stored one exactly)."""
    storage = cfg.storage_config()
    reports = list_reports(cfg.layout().lot_reports(product, lot), storage)
    if not reports:
        return None
    try:
        meta = read_report_metadata(reports[-1], storage)
        if meta.get("method") != FEW_SHOT or not meta.get("maps_uri"):
            return None
        df = read_report(reports[-1], storage)
    except Exception as exc:  # an unreadable old report only costs the reuse
        run_logger().warning(
            "%s/%s: previous report %s unreadable (%s)", product, lot, reports[-1], exc
        )
        return None
    overlays = {
        str(r.image_id): (str(r.content_sha256), str(r.overlay_uri))
        for r in df.itertuples()
        if isinstance(r.overlay_uri, str) and isinstance(r.content_sha256, str)
    }
    scale = overlay_scale(meta.get("threshold"), 0.0)
    return PreviousOverlays(
        maps_uri=meta["maps_uri"],
        scale=scale,
        overlays=overlays,
        thumbs_uri=meta.get("thumbs_uri") or "",
    )


def few_shot_context(
    cfg: PipelineConfig,
    product: str,
    lot: str,
    resolved: ResolvedModel,
    manifest: BankManifest,
    projector: ProjectorManifest | None = None,
    *,
    started,
) -> RunContext:
    """The run context of an audit or re-evaluation: the kNN's threshold from the bank, or
    FoundAD's from the projector when FoundAD decides (scorer foundad)."""
    psettings = cfg.product(product)
    scorer = cfg.scoring_for(product).scorer
    threshold, source = effective_threshold(psettings.threshold, manifest.loo_threshold)
    use_mask = manifest.use_mask
    foundad: dict = {}
    if scorer != "knn":
        if projector is None:
            raise ValueError(f"product {product!r}: scorer {scorer} needs a FoundAD projector")
        f_threshold, f_source = effective_threshold(
            psettings.foundad_threshold, projector.derived_threshold, "foundad_held_out"
        )
        foundad = dict(
            projector_uri=projector.uri,
            foundad_threshold=f_threshold,
            foundad_threshold_source=f_source,
            token_store_uri=resolved.token_store_uri,
            token_settings=resolved.token_settings,
        )
        if scorer == "foundad":  # FoundAD decides; it never masks
            threshold, source, use_mask = f_threshold, f_source, False
    ctx = run_context(
        cfg,
        resolved,
        product,
        lot,
        method=FEW_SHOT,
        started=started,
        threshold=threshold,
        threshold_source=source,
        use_mask=use_mask,
        shots=len(manifest.references),
        reference_version=manifest.version,
        bank_uri=manifest.uri,
        previous=previous_overlays(cfg, product, lot),
        scorer=scorer,
        **foundad,
    )
    if scorer == "both":
        ctx = replace(ctx, foundad_maps_uri=foundad_maps_uri(ctx.maps_uri))
    return ctx


def threshold_reason(
    manifest: BankManifest, projector: ProjectorManifest | None, ctx: RunContext
) -> str:
    """Why the deciding threshold is what it is (the bank's, or the projector's with FoundAD)."""
    if ctx.scorer != "foundad" or projector is None:
        return manifest.threshold_reason
    if ctx.threshold_source == "config":
        return "set in the product config (products.<p>.foundad_threshold)"
    return projector.threshold_reason


def foundad_maps_uri(maps_uri: str) -> str:
    """Scorer both: FoundAD's map archive beside the kNN's, in the run's map folder."""
    return maps_uri.rstrip("/").rsplit("/", 1)[0] + "/foundad_maps.zarr"
