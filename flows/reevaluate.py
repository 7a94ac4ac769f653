"""Re-evaluation after a reference update: re-score past lots from their stored embeddings.

For each lot of the product whose latest few-shot report used another reference version, the
images of that report are re-scored against the new version's bank from the embedding store
(nothing is re-embedded; an image without a stored embedding gets an error row). A new report is
written beside the old one, and a change summary ``changes/<product>/<version>/<run_id>.parquet``
lists every re-scored image with its old and new score and verdict (``verdict_changed``).

``reevaluate_updates`` (the scheduled deployment) finds the products whose latest reference
version is newer than the one their lots were last scored with, and re-evaluates them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pandas as pd
import pyarrow as pa
from prefect import flow

from anomalydino_core.overlays import overlay_scale
from flows import leftovers
from flows.artifacts import publish_run_artifacts
from flows.banks import prepare_bank, prepare_projector, reference_versions, resolve_model
from flows.config import PipelineConfig
from flows.progress import Progress, gather
from flows.run import (
    LotRunSummary,
    bank_references,
    few_shot_context,
    open_map_archive,
    report_metadata,
    summarize,
    threshold_reason,
    write_page,
)
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
from tasks.embed import SourceImage
from tasks.layout import check_name, latest_version, valid_names
from tasks.report import list_reports, read_report, write_report, write_table
from tasks.report import report_metadata as read_report_metadata
from tasks.retry import run_logger
from tasks.run_context import FEW_SHOT
from tasks.score import rescore_stored
from tasks.storage import list_dirs

CHANGE_SCHEMA = pa.schema(
    [
        ("product", pa.string()),
        ("lot", pa.string()),
        ("image_id", pa.string()),
        ("old_run_id", pa.string()),
        ("new_run_id", pa.string()),
        ("old_reference_version", pa.string()),
        ("new_reference_version", pa.string()),
        ("old_score", pa.float64()),
        ("new_score", pa.float64()),
        ("old_threshold", pa.float64()),
        ("new_threshold", pa.float64()),
        ("old_verdict", pa.string()),
        ("new_verdict", pa.string()),
        ("verdict_changed", pa.bool_()),
    ]
)


@dataclass(frozen=True)
class VerdictChange:
    lot: str
    image_id: str
    old_verdict: str
    new_verdict: str
    old_score: float | None
    new_score: float | None


@dataclass(frozen=True)
class ReevaluationSummary:
    product: str
    version: str
    run_id: str | None
    changes_uri: str | None
    lots: list[LotRunSummary] = field(default_factory=list)
    changed: list[VerdictChange] = field(default_factory=list)
    n_images: int = 0
    seconds: float = 0.0

    def text(self) -> str:
        lines = [
            f"re-evaluation {self.product} -> reference version {self.version}: "
            f"{len(self.lots)} lot(s), {self.n_images} images, "
            f"{len(self.changed)} verdict change(s), {self.seconds:.1f}s",
        ]
        if self.changes_uri:
            lines.append(f"  changes     {self.changes_uri}")
        for s in self.lots:
            lines.append(f"  {s.lot}: report {s.report_uri}")
            lines.append(f"  {s.lot}: lot page {s.html_uri or 'not written (see the log)'}")
        for c in self.changed:
            lines.append(
                f"  changed {c.lot}/{c.image_id}: {c.old_verdict} -> {c.new_verdict} "
                f"({_fmt(c.old_score)} -> {_fmt(c.new_score)})"
            )
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or pd.isna(value) else f"{value:.4f}"


def latest_few_shot_report(cfg: PipelineConfig, product: str, lot: str) -> tuple[str, dict] | None:
    """(uri, metadata) of the lot's newest few-shot report, or None."""
    storage = cfg.storage_config()
    for uri in reversed(list_reports(cfg.layout().lot_reports(product, lot), storage)):
        meta = read_report_metadata(uri, storage)
        if meta.get("method") == FEW_SHOT:
            return uri, meta
    return None


def stale_lots(cfg: PipelineConfig, product: str, version: str) -> list[tuple[str, str, dict]]:
    """(lot, report uri, metadata) of lots whose latest few-shot report is of another version."""
    out = []
    for lot in list_dirs(cfg.layout().product_reports(product), cfg.storage_config()):
        latest = latest_few_shot_report(cfg, product, lot)
        if latest is not None and latest[1].get("reference_version") != version:
            out.append((lot, *latest))
    return out


def _none_if_nan(value):
    return None if value is None or pd.isna(value) else value


@flow(name="reevaluate", **leftovers.FLOW_HOOKS)
def reevaluate(
    product: str, version: str | None = None, config: PipelineConfig | None = None
) -> ReevaluationSummary:
    """Re-score the stored lots of ``product`` against ``version`` (default: the latest)."""
    t0 = time.perf_counter()
    started = utc_now()
    cfg = resolve_config(config)
    check_name("product", product)
    log = run_logger()
    storage = cfg.storage_config()
    layout = cfg.layout()
    resolved = resolve_model(cfg, product)
    manifest = prepare_bank(cfg, product, resolved, version)
    projector = prepare_projector(cfg, product, resolved, manifest)
    lots = stale_lots(cfg, product, manifest.version)
    if not lots:
        log.info("%s: every lot is already scored with version %s", product, manifest.version)
        return ReevaluationSummary(product, manifest.version, None, None)
    runner = runner_name(cfg.runtime)
    summaries: list[LotRunSummary] = []
    change_rows: list[dict] = []
    run_id = None
    for lot, old_uri, old_meta in lots:
        lot_t0 = time.perf_counter()
        old = read_report(old_uri, storage).sort_values("image_id")
        ctx = few_shot_context(cfg, product, lot, resolved, manifest, projector, started=started)
        run_id = ctx.run_id
        scale = overlay_scale(ctx.threshold, 0.0)
        open_map_archive(ctx, cfg, scale)
        items = [
            SourceImage(r.image_id, r.image_uri, f"lots/{lot}/{r.image_id}")
            for r in old.itertuples()
        ]
        shas = [_none_if_nan(s) for s in old["content_sha256"]]
        chunks = chunked(items, cfg.runtime.chunk_size)
        futures = [
            rescore_stored.submit(items_chunk, shas_chunk, ctx, manifest, projector)
            for items_chunk, shas_chunk in zip(
                chunks, chunked(shas, cfg.runtime.chunk_size), strict=True
            )
        ]
        with Progress(len(items), f"re-scoring {product}/{lot}") as progress:
            parts = gather(futures, [len(c) for c in chunks], progress)
        rows = [row for part in parts for row in part]
        report_uri = layout.report(product, lot, ctx.run_id)
        meta = report_metadata(
            ctx,
            cfg,
            {
                "runner": runner,
                "bank_key": manifest.key,
                "masking": manifest.masking_evidence,
                "threshold_reason": threshold_reason(manifest, projector, ctx),
                "overlay_scale": list(scale),
                "references": bank_references(manifest),
                "previous_threshold": old_meta.get("threshold"),
                "timings": {"re-scoring": round(time.perf_counter() - lot_t0, 3)},
                "reevaluates": old_uri,
            },
        )
        write_report(report_uri, rows, meta, cfg.storage)
        html_uri = write_page(report_uri, cfg)
        lot_summary = summarize(
            rows, ctx, report_uri, time.perf_counter() - lot_t0, runner, html_uri
        )
        publish_run_artifacts(lot_summary, rows, html_uri)
        summaries.append(lot_summary)
        new_by_id = {r.image_id: r for r in rows}
        for r in old.itertuples():
            new = new_by_id[r.image_id]
            change_rows.append(
                {
                    "product": product,
                    "lot": lot,
                    "image_id": r.image_id,
                    "old_run_id": r.run_id,
                    "new_run_id": ctx.run_id,
                    "old_reference_version": old_meta.get("reference_version"),
                    "new_reference_version": manifest.version,
                    "old_score": _none_if_nan(r.score),
                    "new_score": new.score,
                    "old_threshold": _none_if_nan(r.threshold),
                    "new_threshold": new.threshold,
                    "old_verdict": r.verdict,
                    "new_verdict": new.verdict,
                    "verdict_changed": r.verdict != new.verdict,
                }
            )
    changes_uri = layout.changes(product, manifest.version, run_id)
    table = pa.Table.from_pylist(
        sorted(change_rows, key=lambda c: (c["lot"], c["image_id"])), schema=CHANGE_SCHEMA
    )
    write_table(changes_uri, table, storage)
    changed = [
        VerdictChange(
            c["lot"], c["image_id"], c["old_verdict"], c["new_verdict"], c["old_score"],
            c["new_score"],
        )
        for c in change_rows
        if c["verdict_changed"]
    ]  # fmt: skip
    summary = ReevaluationSummary(
        product=product,
        version=manifest.version,
        run_id=run_id,
        changes_uri=changes_uri,
        lots=summaries,
        changed=sorted(changed, key=lambda c: (c.lot, c.image_id)),
        n_images=len(change_rows),
        seconds=round(time.perf_counter() - t0, 3),
    )
    publish_markdown(
        f"## Re-evaluation {product} -> {manifest.version}\n\n"
        + markdown_table(
            ["lot", "images", "flagged", "errors", "report"],
            [[s.lot, s.n_images, s.n_flagged, s.n_errors, s.report_uri] for s in summaries],
        )
        + f"\n\nChanges: `{changes_uri}`\n\n### Verdict changes ({len(changed)})\n\n"
        + markdown_table(
            ["lot", "image", "old", "new", "old score", "new score"],
            [
                [c.lot, c.image_id, c.old_verdict, c.new_verdict, c.old_score, c.new_score]
                for c in summary.changed
            ],
        )  # fmt: skip
        + "\n",
        artifact_key("reevaluate", product, manifest.version),
        f"re-evaluation {product} {manifest.version}",
    )
    log.info("%s", summary.text().splitlines()[0])  # the CLI prints the whole text
    return summary


@flow(name="reevaluate-on-reference-update")
def reevaluate_updates(
    config: PipelineConfig | None = None, products: list[str] | None = None
) -> list[ReevaluationSummary]:
    """For every product (or ``products``) whose latest reference version is newer than the one
    some of its lots were last scored with, run the re-evaluation."""
    cfg = resolve_config(config)
    log = run_logger()
    names = products or list_dirs(cfg.layout().references_root, cfg.storage_config())
    out: list[ReevaluationSummary] = []
    for product in valid_names("product", names, log.warning):
        version = latest_version(reference_versions(cfg, product))
        if version is None:
            continue
        stale = stale_lots(cfg, product, version)
        if not stale:
            log.info("%s: no lot to re-evaluate for version %s", product, version)
            continue
        log.info(
            "%s: new reference version %s, %d lot(s) to re-score", product, version, len(stale)
        )
        out.append(with_runner(reevaluate, cfg.runtime)(product, version, cfg))
    return out
