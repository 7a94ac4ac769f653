"""Run plumbing shared by the audit, screening and re-evaluation flows: the lot's images, the
few-shot run context, the map archive, and finishing a run (report, artifact, summary)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from anomalydino_core.overlays import overlay_scale
from anomalydino_core.thresholds import effective_threshold
from flows import leftovers
from flows.banks import ModelContext, list_images, run_context
from flows.config import PipelineConfig
from flows.runtime import (
    artifact_key,
    markdown_table,
    publish_markdown,
    runner_name,
)
from tasks.bank import BankManifest
from tasks.embed import SourceImage
from tasks.layout import relative_id
from tasks.map_archive import MapArchive
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
    rows: list[ReportRow], ctx: RunContext, report_uri: str, seconds: float, runner: str
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
    )


def run_markdown(summary: LotRunSummary, rows: list[ReportRow], top: int = 20) -> str:
    """The per-run artifact: a summary table, the most anomalous images, the errors."""
    s = summary
    head = markdown_table(
        ["product", "lot", "run", "method", "images", "flagged", "errors", "reused", "threshold",
         "seconds"],
        [[s.product, s.lot, s.run_id, s.method, s.n_images, s.n_flagged, s.n_errors, s.n_reused,
          s.threshold, s.seconds]],
    )  # fmt: skip
    scored = sorted((r for r in rows if r.score is not None), key=lambda r: -r.score)[:top]
    flagged = markdown_table(
        ["image", "score", "verdict", "peak (y, x)", "overlay"],
        [[r.image_id, r.score, r.verdict, f"({r.max_patch_y}, {r.max_patch_x})", r.overlay_uri]
         for r in scored],
    )  # fmt: skip
    parts = [f"## {s.method} {s.product} / {s.lot}\n", head, f"\nReport: `{s.report_uri}`\n"]
    parts += [f"### Highest scores (top {top})\n", flagged]
    errors = [r for r in rows if r.error]
    if errors:
        parts += [
            "\n### Errors\n",
            markdown_table(["image", "error"], [[r.image_id, r.error] for r in errors]),
        ]
    return "\n".join(parts) + "\n"


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
        "run_started_at": ctx.run_started_at.isoformat(),
        "model": cfg.model.model_dump(mode="json"),
        "scoring": cfg.scoring_for(ctx.product).model_dump(mode="json"),
        **extra,
    }


def finish_run(
    job: str,
    ctx: RunContext,
    cfg: PipelineConfig,
    rows: list[ReportRow],
    extra: dict[str, Any],
    t0: float,
) -> LotRunSummary:
    """Write the run's report, publish its artifact, log and return its summary."""
    report_uri = cfg.layout().report(ctx.product, ctx.lot, ctx.run_id)
    runner = runner_name(cfg.runtime)
    meta = report_metadata(
        ctx,
        cfg,
        {"runner": runner, **extra, "seconds_to_report": round(time.perf_counter() - t0, 3)},
    )
    write_report(report_uri, rows, meta, cfg.storage)
    summary = summarize(rows, ctx, report_uri, time.perf_counter() - t0, runner)
    publish_markdown(
        run_markdown(summary, rows),
        artifact_key(job, ctx.product, ctx.lot),
        f"{job} {ctx.product}/{ctx.lot} run {ctx.run_id}",
    )
    run_logger().info(
        "%s %s/%s run %s: %d images, %d flagged, %d errors in %.1fs; report %s",
        ctx.method,
        ctx.product,
        ctx.lot,
        ctx.run_id,
        summary.n_images,
        summary.n_flagged,
        summary.n_errors,
        summary.seconds,
        report_uri,
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
    return PreviousOverlays(maps_uri=meta["maps_uri"], scale=scale, overlays=overlays)


def few_shot_context(
    cfg: PipelineConfig,
    product: str,
    lot: str,
    mc: ModelContext,
    manifest: BankManifest,
    *,
    started,
) -> RunContext:
    threshold, source = effective_threshold(cfg.product(product).threshold, manifest.loo_threshold)
    return run_context(
        cfg,
        mc,
        product,
        lot,
        method=FEW_SHOT,
        started=started,
        threshold=threshold,
        threshold_source=source,
        use_mask=manifest.use_mask,
        shots=len(manifest.references),
        reference_version=manifest.version,
        bank_uri=manifest.uri,
        previous=previous_overlays(cfg, product, lot),
    )
