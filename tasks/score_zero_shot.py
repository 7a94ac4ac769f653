"""Zero-shot scoring task: one query block of a shipment against all its other images
(METHOD.md section 4), maps written; overlays come after the shipment threshold is known."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from prefect import task

from anomalydino_core.float16 import to_float32
from anomalydino_core.zero_shot import LazyFeatureSource, MutualScoringConfig, score_mutual
from tasks.embed import SourceImage
from tasks.map_archive import MapArchive
from tasks.models import compute_lock, pin_threads
from tasks.overlays import put_map
from tasks.retry import run_logger, with_storage_retries
from tasks.run_context import TASK_OPTIONS, RunContext, open_store


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


@task(name="score-zero-shot-block", **TASK_OPTIONS)
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
    store = open_store(ctx, storage)
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
            for i, m in zip(
                query, pool.map(lambda i: store.foreground(store.get(ids[i])), query), strict=True
            ):
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
                pool.submit(put_map, archive, im.item.image_id, im.item.uri, r.anomaly_map, r.score)
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
