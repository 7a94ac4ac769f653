"""Shipment screening: batched zero-shot scoring of an unlabeled shipment, no references.

Every image is scored against the patches of all the other images of the shipment (METHOD.md
section 4). The queries are split into ``runtime.zero_shot_blocks`` fixed blocks (one task each,
any runner); each block reads the shipment's stored embeddings. Threshold: the product's
``zero_shot_threshold`` or, by default, ``zero_shot_ratio`` (2) x the lowest-decile score of the
shipment (``thresholds.zero_shot_low_quantile``): the best tenth of a shipment is taken as normal
and images scoring more than twice its level are flagged.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
from prefect import flow

from anomalydino_core.masking import TESTED_SCREENING_IMAGES, decide_masking
from anomalydino_core.overlays import overlay_scale
from anomalydino_core.thresholds import screening_threshold
from anomalydino_core.zero_shot import MutualScoringConfig, split_query_indices
from flows import leftovers
from flows.banks import embed_chunks, resolve_model, run_context
from flows.config import PipelineConfig
from flows.progress import Progress, gather
from flows.run import LotRunSummary, finish_run, lot_items, open_map_archive
from flows.runtime import (
    chunked,
    resolve_config,
    utc_now,
)
from tasks.embedding_store import EmbeddingStore
from tasks.overlays import write_overlays
from tasks.report import ReportRow
from tasks.retry import run_logger
from tasks.run_context import ZERO_SHOT, make_row
from tasks.score_zero_shot import StoredImage, score_zero_shot_block
from tasks.storage import exists


@flow(name="screen-shipment", **leftovers.FLOW_HOOKS)
def screen_shipment(
    product: str, shipment: str, config: PipelineConfig | None = None
) -> LotRunSummary:
    """Zero-shot screening of ``incoming/<product>/<shipment>``: report, maps, overlays."""
    t0 = time.perf_counter()
    started = utc_now()
    cfg = resolve_config(config)
    lot_uri = cfg.layout().lot(product, shipment)  # names are checked there, once
    log = run_logger()
    storage = cfg.storage_config()
    scoring = cfg.scoring_for(product)
    resolved = resolve_model(cfg, product)
    items = lot_items(cfg, product, shipment)
    if not items and not exists(lot_uri, storage):
        raise FileNotFoundError(f"{product}/{shipment}: no shipment at {lot_uri}")
    t_setup = time.perf_counter()
    chunks = chunked(items, cfg.runtime.chunk_size)
    # masking is decided after: scoring computes what it needs
    summaries = embed_chunks(chunks, resolved, cfg, f"embedding {product}/{shipment}", masks=False)
    t_embedded = time.perf_counter()

    by_id = {it.image_id: it for it in items}
    ok: list[StoredImage] = []
    failed: list[tuple] = []
    reused: dict[str, bool] = {}
    store = EmbeddingStore.open(
        resolved.store_uri, resolved.settings, storage, create=False, read_only=True
    )
    for s in summaries:
        for image_id, sha, nbytes, error, was_reused in zip(
            s.image_ids, s.content_sha256, s.file_sizes, s.errors, s.reused, strict=True
        ):
            item = by_id[image_id]
            if error is not None:
                failed.append((item, sha, nbytes, error))
                continue
            attrs = store.attributes(item.store_id)
            size = tuple(attrs["image_size"])
            ok.append(StoredImage(item, sha, nbytes, size, tuple(attrs["grid"])))
            reused[image_id] = was_reused

    tested = ok[:TESTED_SCREENING_IMAGES]  # no references: the first images are tested
    views = [
        (t.item.image_id, store.get(t.item.store_id).features.astype(np.float32)) for t in tested
    ]
    decision = decide_masking(scoring.masking, views, threshold=resolved.mask_threshold)
    use_mask, masking_reason = decision.use_mask, decision.reason
    ctx = run_context(
        cfg,
        resolved,
        product,
        shipment,
        method=ZERO_SHOT,
        started=started,
        threshold=None,
        threshold_source="pending",
        use_mask=use_mask,
    )
    open_map_archive(ctx, cfg, None)
    log.info(
        "screening %s/%s: %d images (%d unreadable), masking %s: %s",
        product,
        shipment,
        len(items),
        len(failed),
        "on" if use_mask else "off",
        masking_reason,
    )
    scores = []
    if len(ok) >= 2:
        zconfig = MutualScoringConfig.from_settings(
            scoring, device="cpu" if cfg.model.device == "cpu" else "auto"
        )
        blocks = split_query_indices(len(ok), cfg.runtime.zero_shot_blocks)
        block_futures = [score_zero_shot_block.submit(b, ok, ctx, zconfig) for b in blocks]
        with Progress(len(ok), f"screening {product}/{shipment}") as progress:
            done = gather(block_futures, [len(b) for b in blocks], progress)
        scores = sorted((z for part in done for z in part), key=lambda z: z.index)
    elif ok:
        log.warning("%s/%s: a single readable image cannot be screened", product, shipment)

    t = cfg.thresholds
    decided = screening_threshold(
        cfg.product(product).zero_shot_threshold,
        [z.score for z in scores],
        low_quantile=t.zero_shot_low_quantile,
        ratio=t.zero_shot_ratio,
    )
    threshold, source = decided.value, decided.source
    if threshold is None:
        log.warning("%s/%s: no threshold: %s", product, shipment, decided.reason)
    ctx = replace(ctx, threshold=threshold, threshold_source=source)
    t_scored = time.perf_counter()
    lot_max = max((z.map_max for z in scores), default=0.0)
    scale = overlay_scale(threshold, lot_max)

    rows: list[ReportRow] = []
    for z in scores:
        im = ok[z.index]
        rows.append(
            make_row(
                ctx,
                im.item,
                content_sha256=im.content_sha256,
                file_size=im.file_size,
                image_size=im.image_size,
                reused=reused[im.item.image_id],
                score=z.score,
                masked_fraction=z.masked_fraction,
                max_patch=z.max_patch,
                grid=im.grid,
                map_uri=ctx.map_uri(im.item.image_id),
                overlay_uri=ctx.overlay_uri(im.item.image_id),
            )
        )
    for item, sha, nbytes, error in failed:
        rows.append(
            make_row(ctx, item, content_sha256=sha, file_size=nbytes, image_size=None,
                     reused=None, error=error)
        )  # fmt: skip
    flagged = [(r.image_id, r.image_uri) for r in rows if r.is_anomalous]
    if flagged:
        written = write_overlays(flagged, ctx, scale)
        missing = {fid for (fid, _), uri in zip(flagged, written, strict=True) if uri is None}
        rows = [replace(r, overlay_uri=None) if r.image_id in missing else r for r in rows]

    return finish_run(
        "screen",
        ctx,
        cfg,
        rows,
        {
            "masking": decision.to_dict(),
            "threshold_reason": decided.reason,
            "overlay_scale": list(scale),
            "timings": {
                "model and listing": round(t_setup - t0, 3),
                "embedding": round(t_embedded - t_setup, 3),
                "zero-shot scoring": round(t_scored - t_embedded, 3),
                "overlays": round(time.perf_counter() - t_scored, 3),
            },
        },
        t0,
    )
