"""The lot audit: score every image of a production lot against the product's reference bank.

``audit_lot`` audits one lot; ``nightly_audit`` (the scheduled deployment) finds the lots under
the incoming prefix that have no report yet and audits each of them.
"""

from __future__ import annotations

import time

from prefect import flow

from anomalydino_core.overlays import overlay_scale
from flows import leftovers
from flows.banks import prepare_bank, prepare_projector, reference_versions, resolve_model
from flows.config import PipelineConfig
from flows.progress import Progress, gather
from flows.run import (
    LotRunSummary,
    bank_references,
    few_shot_context,
    finish_run,
    lot_items,
    open_map_archive,
    threshold_reason,
)
from flows.runtime import (
    artifact_key,
    chunked,
    markdown_table,
    publish_markdown,
    resolve_config,
    utc_now,
    with_runner,
)
from tasks.layout import valid_names
from tasks.report import list_reports
from tasks.retry import run_logger
from tasks.score import score_images
from tasks.storage import exists, list_dirs


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
    lot_uri = cfg.layout().lot(product, lot)  # names are checked there, once (tasks/layout.py)
    log = run_logger()
    resolved = resolve_model(cfg, product)
    manifest = prepare_bank(cfg, product, resolved, version)
    projector = prepare_projector(cfg, product, resolved, manifest)
    ctx = few_shot_context(cfg, product, lot, resolved, manifest, projector, started=started)
    items = lot_items(cfg, product, lot)
    if not items:
        if not exists(lot_uri, cfg.storage_config()):
            raise FileNotFoundError(f"{product}/{lot}: no lot at {lot_uri}")
        log.warning("%s/%s: no images under %s", product, lot, lot_uri)
    scale = overlay_scale(ctx.threshold, 0.0)
    open_map_archive(ctx, cfg, scale)
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
    t_setup = time.perf_counter()
    chunks = chunked(items, cfg.runtime.chunk_size)
    futures = [score_images.submit(chunk, ctx, manifest, projector) for chunk in chunks]
    with Progress(len(items), f"scoring {product}/{lot}") as progress:
        rows = [row for part in gather(futures, [len(c) for c in chunks], progress) for row in part]
    timings = {
        "model, bank and listing": round(t_setup - t0, 3),
        "embedding and scoring": round(time.perf_counter() - t_setup, 3),
    }
    return finish_run(
        "audit",
        ctx,
        cfg,
        rows,
        {
            "bank_key": manifest.key,
            "masking": manifest.masking_evidence,
            "threshold_reason": threshold_reason(manifest, projector, ctx),
            "overlay_scale": list(scale),
            "references": bank_references(manifest),
            "timings": timings,
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
