"""The ``embed-images`` task: make sure a chunk of images is in an embedding store (reference
sets, screening shipments); lot images are embedded inside ``score-images`` instead."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.embed import SourceImage, embed_sources
from tasks.embedding_store import EmbeddingStore
from tasks.models import embedder
from tasks.retry import TASK_RETRY_OPTIONS, run_logger


@dataclass(frozen=True)
class EmbedSummary:
    """What an embedding task did (small: safe to return through any task runner)."""

    image_ids: tuple[str, ...]
    content_sha256: tuple[str | None, ...]
    image_sizes: tuple[tuple[int, int] | None, ...]
    file_sizes: tuple[int | None, ...]
    reused: tuple[bool, ...]
    errors: tuple[str | None, ...]
    seconds: float

    @property
    def n_reused(self) -> int:
        return sum(1 for r, e in zip(self.reused, self.errors, strict=True) if r and e is None)

    @property
    def n_computed(self) -> int:
        return sum(1 for r, e in zip(self.reused, self.errors, strict=True) if not r and e is None)


@task(
    name="embed-images",
    **TASK_RETRY_OPTIONS,
    cache_policy=NO_CACHE,
)
def embed_images(
    items: list[SourceImage],
    store_uri: str,
    store_settings: dict,
    model_settings,
    threads: int,
    io_threads: int,
    storage_settings,
    masks: bool = True,
) -> EmbedSummary:
    """Ensure ``items`` are embedded in the store at ``store_uri``; no features come back.
    ``masks=False``: new entries are stored without their foreground mask (``embed_sources``)."""
    t0 = time.perf_counter()
    storage = storage_settings.storage_config()
    model = embedder(model_settings, storage)
    store = EmbeddingStore.open(store_uri, store_settings, storage)
    with ThreadPoolExecutor(io_threads, thread_name_prefix="embed-io") as pool:
        results = embed_sources(
            items,
            store,
            model,
            threads=threads,
            pool=pool,
            storage=storage,
            load_features=False,
            max_pixels=model_settings.decode_max_pixels,
            masks=masks,
        )
    summary = EmbedSummary(
        image_ids=tuple(r.item.image_id for r in results),
        content_sha256=tuple(r.content_sha256 for r in results),
        image_sizes=tuple(r.image_size for r in results),
        file_sizes=tuple(r.file_size for r in results),
        reused=tuple(r.reused for r in results),
        errors=tuple(r.error for r in results),
        seconds=time.perf_counter() - t0,
    )
    run_logger().info(
        "embedded %d images (%d computed, %d reused, %d errors) in %.1fs",
        len(results),
        summary.n_computed,
        summary.n_reused,
        len(results) - summary.n_computed - summary.n_reused,
        summary.seconds,
    )
    return summary
