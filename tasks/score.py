"""Few-shot scoring tasks: a chunk of a lot embedded (or reused) and scored against the bank
(audit), or stored embeddings re-scored against a new bank (re-evaluation). Maps and overlays are
written by ``tasks.overlays``."""

from __future__ import annotations

import functools
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from prefect import task

from anomalydino_core.few_shot import ScoreResult
from anomalydino_core.float16 import to_float32
from anomalydino_core.foundad.config import FoundADConfig
from anomalydino_core.foundad.scoring import grid_errors, score_result
from tasks.bank import BankManifest, load_scorer
from tasks.embed import EmbeddedSource, SourceImage, embed_sources
from tasks.embedding_store import EmbeddedImage
from tasks.map_archive import MapArchive
from tasks.models import compute_lock, pin_threads
from tasks.overlays import record_scored
from tasks.projector import ProjectorManifest, load_projector
from tasks.report import ReportRow
from tasks.retry import run_logger
from tasks.run_context import (
    TASK_OPTIONS,
    RunContext,
    error_row,
    make_row,
    open_store,
    open_token_store,
    run_model,
)
from tasks.search_choices import load_search_choices, save_search_choices
from tasks.storage import StorageConfig


class ChunkScorers:
    """The scorers of one chunk: the bank (kNN) and/or the projector (FoundAD), loaded once per
    process; ``search`` runs both on a chunk (one ``compute_lock()``), ``results`` turns one
    image's outputs into (deciding result, FoundAD result or None)."""

    def __init__(
        self,
        ctx: RunContext,
        manifest: BankManifest,
        projector: ProjectorManifest | None,
        storage: StorageConfig,
    ) -> None:
        self.ctx = ctx
        load_search_choices()
        self.knn = load_scorer(manifest, storage) if ctx.uses_knn else None
        self.projector = None
        if ctx.uses_foundad:
            if projector is None or projector.uri != ctx.projector_uri:
                raise ValueError(f"run {ctx.run_id}: the projector {ctx.projector_uri} is needed")
            self.projector = load_projector(projector, storage)
            self.foundad_config = FoundADConfig.from_dict(projector.config).scoring

    def search(self, features, masks, tokens) -> tuple[list, list]:
        """Per image: kNN patch distances (or None) and FoundAD patch errors (or None)."""
        n = len(features)
        with compute_lock():
            patches = self.knn.patch_distances(features, masks) if self.knn else [None] * n
            save_search_choices()
            errors = (
                grid_errors(self.projector, tokens, self.foundad_config)
                if self.projector is not None
                else [None] * n
            )
        return patches, errors

    def results(
        self, patch, errors, image_size: tuple[int, int], foreground
    ) -> tuple[ScoreResult, ScoreResult | None]:
        knn = None
        if patch is not None:
            knn = self.knn.result(patch, image_size=image_size, foreground=foreground)
        foundad = None
        if errors is not None:
            foundad = score_result(errors, image_size, self.foundad_config)
        return (foundad if self.ctx.scorer == "foundad" else knn), foundad


def _foundad_archive(ctx: RunContext, storage: StorageConfig) -> MapArchive | None:
    if ctx.foundad_maps_uri is None:
        return None
    return MapArchive.open(ctx.foundad_maps_uri, None, storage, create=False)


@task(name="score-images", **TASK_OPTIONS)
def score_images(
    items: list[SourceImage],
    ctx: RunContext,
    manifest: BankManifest,
    projector: ProjectorManifest | None = None,
) -> list[ReportRow]:
    """Embed (or reuse) a chunk of a lot, score it against the bank, write maps and overlays.

    Phases, each with the cores to itself: embedding (FoundAD's tokens from the same pass);
    one bank search and/or projector pass for the whole chunk (``compute_lock()``); then maps,
    image scores, map and overlay writes in the I/O pool.
    """
    t0 = time.perf_counter()
    storage = ctx.storage.storage_config()
    store = open_store(ctx, storage)
    scorers = ChunkScorers(ctx, manifest, projector, storage)
    archive = MapArchive.open(ctx.maps_uri, None, storage, create=False)
    foundad_archive = _foundad_archive(ctx, storage)

    def finish(res: EmbeddedSource, patch: np.ndarray | None, errors) -> ReportRow:
        fg = res.masks[0] if ctx.use_mask else None
        result, foundad = scorers.results(patch, errors, res.image_size, fg)
        row = record_scored(
            ctx,
            res.item,
            result,
            archive=archive,
            storage=storage,
            content_sha256=res.content_sha256,
            file_size=res.file_size,
            image_size=res.image_size,
            reused=res.reused,
            image=res.image,
            foundad=foundad,
            foundad_archive=foundad_archive,
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
            token_store=open_token_store(ctx, storage),
            masks=ctx.use_mask,
        )
        t_embedded = time.perf_counter()
        ok = [res for res in results if res.ok]
        patches, errors = scorers.search(
            [res.features[0] for res in ok],
            [res.masks[0] if ctx.use_mask else None for res in ok],
            [res.tokens[0] for res in ok] if ctx.uses_foundad else None,
        )
        for res in ok:
            res.features, res.tokens = [], []
        t_searched = time.perf_counter()
        finished = {
            id(res): pool.submit(finish, res, patch, error)
            for res, patch, error in zip(ok, patches, errors, strict=True)
        }
        rows = [finished[id(res)].result() if res.ok else error_row(ctx, res) for res in results]
    t_end = time.perf_counter()
    run_logger().info(
        "scored %d images (%d reused embeddings, %d errors) in %.1fs: embed %.1fs, bank search "
        "and/or projector %.1fs, maps and their writes %.1fs",
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
    projector: ProjectorManifest | None = None,
) -> list[ReportRow]:
    """Re-score images from their stored embeddings only (never re-embeds): re-evaluation.
    FoundAD needs the lot's stored tokens too (stored by audits whose scorer used FoundAD)."""
    storage = ctx.storage.storage_config()
    store = open_store(ctx, storage)
    token_store = open_token_store(ctx, storage)
    pin_threads(ctx.threads)
    scorers = ChunkScorers(ctx, manifest, projector, storage)
    archive = MapArchive.open(ctx.maps_uri, None, storage, create=False)
    foundad_archive = _foundad_archive(ctx, storage)

    def load(item: SourceImage, sha: str | None):
        if sha is None:
            return None, "no stored embedding: the image was unreadable when the lot was audited"
        if not store.has(item.store_id, sha):
            return None, (
                f"no stored embedding with content sha256 {sha[:12]}... for these model settings"
            )
        if token_store is not None and not token_store.has(item.store_id, sha):
            return None, (
                "no stored FoundAD tokens (the lot was audited with scorer knn): audit it again "
                "to score it with FoundAD"
            )
        tokens = (
            None if token_store is None else to_float32(token_store.get(item.store_id).features)
        )
        return (store.get(item.store_id), tokens), None

    def finish(item: SourceImage, entry: EmbeddedImage, fg, patch, errors) -> ReportRow:
        result, foundad = scorers.results(patch, errors, entry.image_size, fg)
        return record_scored(
            ctx,
            item,
            result,
            archive=archive,
            storage=storage,
            content_sha256=entry.content_sha256,
            file_size=None,
            image_size=entry.image_size,
            reused=True,
            foundad=foundad,
            foundad_archive=foundad_archive,
        )

    with ThreadPoolExecutor(ctx.io_threads, thread_name_prefix="rescore-io") as pool:
        loaded = list(pool.map(load, items, expected_sha256))
        found = [(item, got) for item, (got, _) in zip(items, loaded, strict=True) if got]
        entries = [entry for _, (entry, _) in found]
        fgs = list(pool.map(store.foreground, entries)) if ctx.use_mask else [None] * len(found)
        patches, errors = scorers.search(
            [to_float32(entry.features) for entry in entries],
            fgs,
            [tokens for _, (_, tokens) in found],
        )
        finished = {
            id(got): pool.submit(finish, item, got[0], fg, patch, error)
            for (item, got), fg, patch, error in zip(found, fgs, patches, errors, strict=True)
        }
        rows = []
        for item, sha, (got, error) in zip(items, expected_sha256, loaded, strict=True):
            if got is not None:
                rows.append(finished[id(got)].result())
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
