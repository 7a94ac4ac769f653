"""Few-shot scoring tasks: a chunk of a lot embedded (or reused) and scored against the bank
(audit), or stored embeddings re-scored against a new bank (re-evaluation). Maps and overlays are
written by ``tasks.overlays``."""

from __future__ import annotations

import functools
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from prefect import task

from anomalydino_core.half import to_float32
from tasks.bank import BankManifest, load_scorer
from tasks.embed import EmbeddedSource, SourceImage, embed_sources
from tasks.embedding_store import EmbeddedImage
from tasks.map_archive import MapArchive
from tasks.models import compute_lock, pin_threads
from tasks.overlays import record_scored
from tasks.report import ReportRow
from tasks.retry import run_logger
from tasks.run_context import TASK_OPTIONS, RunContext, error_row, make_row, open_store, run_model


@task(name="score-images", **TASK_OPTIONS)
def score_images(
    items: list[SourceImage], ctx: RunContext, manifest: BankManifest
) -> list[ReportRow]:
    """Embed (or reuse) a chunk of a lot, score it against the bank, write maps and overlays.

    Phases, each with the cores to itself: embedding; one bank search for the whole chunk
    (``compute_lock()``); then maps, image scores, map and overlay writes in the I/O pool.
    """
    t0 = time.perf_counter()
    storage = ctx.storage.storage_config()
    store = open_store(ctx, storage)
    scorer = load_scorer(manifest, storage)
    archive = MapArchive.open(ctx.maps_uri, None, storage, create=False)

    def finish(res: EmbeddedSource, patch: np.ndarray) -> ReportRow:
        fg = res.masks[0] if ctx.use_mask else None
        row = record_scored(
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
            functools.partial(run_model, ctx, storage),  # loaded only if an image needs it
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


@task(name="rescore-stored", **TASK_OPTIONS)
def rescore_stored(
    items: list[SourceImage],
    expected_sha256: list[str | None],
    ctx: RunContext,
    manifest: BankManifest,
) -> list[ReportRow]:
    """Re-score images from their stored embeddings only (never re-embeds): re-evaluation."""
    storage = ctx.storage.storage_config()
    store = open_store(ctx, storage)
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
        return record_scored(
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
