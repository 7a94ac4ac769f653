"""The lot audit: score every image of a production lot against the product's reference bank.

``audit_lot`` audits one lot; ``nightly_audit`` (the scheduled deployment) finds the lots under
the incoming prefix that have no report yet and audits each of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from prefect import flow

from anomalydino_core.thresholds import effective_threshold
from flows import leftovers
from flows.build_bank import (
    ModelContext,
    list_images,
    model_context,
    prepare_bank,
    reference_versions,
    run_context,
)
from flows.config import PipelineConfig
from flows.runtime import (
    artifact_key,
    chunked,
    markdown_table,
    publish_markdown,
    resolve_config,
    runner_name,
    utc_now,
    with_runner,
)
from tasks.bank import BankManifest
from tasks.embed import SourceImage
from tasks.layout import check_name, relative_id, valid_names
from tasks.map_archive import MapArchive
from tasks.report import ReportRow, list_reports, read_report, write_report
from tasks.report import report_metadata as read_report_metadata
from tasks.retry import run_logger
from tasks.score import FEW_SHOT, PreviousOverlays, RunContext, overlay_scale, score_images
from tasks.storage import exists, list_dirs


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


@flow(name="audit-lot", **leftovers.FLOW_HOOKS)
def audit_lot(
    product: str,
    lot: str,
    config: PipelineConfig | None = None,
    version: str | None = None,
) -> LotRunSummary:
    """Score every image of ``incoming/<product>/<lot>`` against the bank of the product's
    latest reference version (or ``version``); write the report, maps and overlays."""
    t0 = time.perf_counter()
    started = utc_now()
    cfg = resolve_config(config)
    check_name("product", product)
    check_name("lot", lot)
    log = run_logger()
    mc = model_context(cfg, product)
    manifest = prepare_bank(cfg, product, mc, version)
    ctx = few_shot_context(cfg, product, lot, mc, manifest, started=started)
    items = lot_items(cfg, product, lot)
    if not items:
        prefix = cfg.layout().lot(product, lot)
        if not exists(prefix, cfg.storage_config()):
            raise FileNotFoundError(f"{product}/{lot}: no lot at {prefix}")
        log.warning("%s/%s: no images under %s", product, lot, prefix)
    open_map_archive(ctx, cfg, overlay_scale(ctx.threshold, 0.0))
    log.info(
        "auditing %s/%s: %d images, bank %s (%s, %d patches), threshold %s (%s)",
        product,
        lot,
        len(items),
        manifest.version,
        manifest.key,
        manifest.bank_patches,
        ctx.threshold,
        ctx.threshold_source,
    )
    futures = [
        score_images.submit(chunk, ctx, manifest)
        for chunk in chunked(items, cfg.runtime.chunk_size)
    ]
    rows = [row for fut in futures for row in fut.result()]
    return finish_run(
        "audit",
        ctx,
        cfg,
        rows,
        {
            "bank_key": manifest.key,
            "masking": manifest.masking_evidence,
            "threshold_reason": manifest.threshold_reason,
        },
        t0,
    )


def lots_without_report(cfg: PipelineConfig, product: str) -> list[str]:
    layout, storage = cfg.layout(), cfg.storage_config()
    out = []
    lots = list_dirs(layout.product_incoming(product), storage)
    for lot in valid_names("lot", lots, run_logger().warning):
        if not list_reports(layout.lot_reports(product, lot), storage):
            out.append(lot)
    return out


@flow(name="nightly-audit")
def nightly_audit(
    config: PipelineConfig | None = None, products: list[str] | None = None
) -> list[LotRunSummary]:
    """Audit every lot under ``incoming/<product>/`` that has no report yet (all products with
    references, or ``products``). A failing lot does not stop the others; the run fails at the
    end if any lot failed."""
    cfg = resolve_config(config)
    log = run_logger()
    storage = cfg.storage_config()
    names = products or list_dirs(cfg.layout().incoming_root, storage)
    done: list[LotRunSummary] = []
    failed: list[str] = []
    for product in valid_names("product", names, log.warning):
        if not reference_versions(cfg, product):
            log.warning("%s: no reference set, cannot audit (screen it instead)", product)
            continue
        lots = lots_without_report(cfg, product)
        log.info("%s: %d new lot(s): %s", product, len(lots), ", ".join(lots) or "-")
        for lot in lots:
            state = with_runner(audit_lot, cfg.runtime)(product, lot, cfg, return_state=True)
            if state.is_completed():
                done.append(state.result())
            else:
                failed.append(f"{product}/{lot}: {state.message}")
    publish_markdown(
        markdown_table(
            ["product", "lot", "images", "flagged", "errors", "report"],
            [[s.product, s.lot, s.n_images, s.n_flagged, s.n_errors, s.report_uri] for s in done],
        )
        + ("\n\nFailed lots:\n" + "\n".join(f"- {f}" for f in failed) if failed else ""),
        artifact_key("nightly-audit"),
        "nightly audit",
    )
    if failed:
        raise RuntimeError(f"{len(failed)} lot(s) failed: " + "; ".join(failed))
    return done
