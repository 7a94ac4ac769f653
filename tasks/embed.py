"""Read images, embed the ones not yet in the store, keep the rest: incremental and idempotent.

An image is identified in the embedding store by a store id (``lots/<lot>/<image id>`` for lot
images, ``references/<content sha256>/rot<angle>`` for reference views) and is recomputed only if
no complete entry with the same content hash exists there (the store's settings already pin the
model and preprocessing). Entries become visible only once complete, so a run killed halfway
leaves nothing half-written behind and the next run resumes where it stopped.

Features are stored as float16 and always scored as the float16 values widened to float32, so a
first run and a re-run from stored embeddings give identical scores.

I/O and decoding run in a thread pool and overlap with the model (one computation at a time per
process, under ``tasks.models.compute_lock()``).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from anomalydino_core.augment import rotate_image
from anomalydino_core.float16 import float16_checked, to_float32
from anomalydino_core.foundad.features import embed_with_foundad
from anomalydino_core.images import DECODE_MAX_PIXELS, ImageDecodeError, decode_image
from anomalydino_core.masking import foreground_mask
from tasks.embedding_store import EmbeddedImage, EmbeddingStore
from tasks.models import Embedder, compute_lock, pin_threads, tune_allocator
from tasks.retry import run_logger, with_storage_retries
from tasks.storage import PERMANENT_ERRORS, StorageConfig, read_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceImage:
    """One image to embed: its id in reports, where it is, and its id in the embedding store.

    ``store_id`` may contain ``{sha256}`` (content-addressed references). ``angles``: rotated
    views to embed, each stored as ``<store_id>/rot<angle>``; ``None`` embeds the image once
    under ``store_id`` itself. ``refused``: why the listing refused to read it (a symbolic link
    out of the lot): the image becomes an error row without a read.
    """

    image_id: str
    uri: str
    store_id: str
    angles: tuple[int, ...] | None = None
    refused: str | None = None

    def store_ids(self, sha256: str) -> list[str]:
        base = self.store_id.format(sha256=sha256)
        if self.angles is None:
            return [base]
        return [f"{base}/rot{a:03d}" for a in self.angles]


@dataclass(eq=False)
class EmbeddedSource:
    """What one image gave: its views' features (float16 widened to float32) or an error."""

    item: SourceImage
    content_sha256: str | None = None
    file_size: int | None = None
    image_size: tuple[int, int] | None = None
    features: list[np.ndarray] = field(default_factory=list)  # one (gh, gw, C) per view
    masks: list[np.ndarray] = field(default_factory=list)  # one (gh, gw) bool per view
    tokens: list[np.ndarray] = field(default_factory=list)  # FoundAD's (gh, gw, D) per view
    image: np.ndarray | None = None  # decoded RGB when it was decoded in this run
    reused: bool = False
    knn_stored: bool = False  # the kNN features were stored, the FoundAD tokens were not
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_source(uri: str, storage: StorageConfig | None) -> bytes:
    """The bytes of ``uri``; transient storage errors are retried here (within the outage
    budget of ``tasks.retry``); a missing or forbidden object raises at once."""
    return with_storage_retries(lambda: read_bytes(uri, storage), what=f"read {uri}")


def load_image(
    uri: str, image_id: str, storage: StorageConfig | None, max_pixels: int | None
) -> np.ndarray:
    """Read and decode one image (``ImageDecodeError`` if it cannot be decoded or is refused)."""
    return decode_image(read_source(uri, storage), image_id, max_pixels=max_pixels)


def _read_one(item: SourceImage, storage: StorageConfig | None) -> tuple[bytes | None, str | None]:
    if item.refused is not None:
        return None, f"{item.image_id}: {item.refused}"
    try:
        return read_source(item.uri, storage), None
    except PERMANENT_ERRORS as exc:
        reason = {
            FileNotFoundError: "file disappeared before it could be read",
            PermissionError: "permission denied",
        }.get(type(exc), str(exc))
        return None, f"{item.image_id}: cannot read {item.uri} ({reason})"


def _decode(
    item: SourceImage, data: bytes, max_pixels: int | None, min_edge: int
) -> tuple[np.ndarray | None, str | None]:
    try:
        return decode_image(data, item.image_id, max_pixels=max_pixels, min_edge=min_edge), None
    except ImageDecodeError as exc:
        return None, str(exc)


def embed_sources(
    items: Sequence[SourceImage],
    store: EmbeddingStore,
    model: Embedder | Callable[[], Embedder],
    *,
    threads: int,
    pool: ThreadPoolExecutor,
    storage: StorageConfig | None = None,
    keep_images: bool = False,
    load_features: bool = True,
    max_pixels: int | None = DECODE_MAX_PIXELS,
    token_store: EmbeddingStore | None = None,
    masks: bool = True,
) -> list[EmbeddedSource]:
    """Make sure every item is in ``store``; returns one result per item, in input order.

    Unreadable/undecodable images give an error result (never an exception). Transient storage
    errors propagate (the caller's task retries; finished images are not redone). ``model``
    may be a function returning the model: it is then called only if an image needs embedding
    (a re-run that reuses every embedding never loads the backbone).
    ``keep_images`` keeps decoded pixels on the results; ``load_features=False`` only ensures
    the store (results carry no features). Images over ``max_pixels`` or smaller than one
    patch of the store's backbone are error results, refused from their header.
    ``token_store``: also make sure of FoundAD's tokens (same backbone pass, ``tokens`` on the
    results); an image whose kNN features are stored but not its tokens is embedded again for
    the tokens only: its stored features are kept and used, so its kNN scores never change.
    ``masks=False``: the product's masking is off, so new embeddings are stored without their
    foreground mask (the PCA is 2-8 ms of CPU per image; ``EmbeddingStore.foreground`` computes
    it from the stored features if a later run needs it) and results carry a stored mask or None.
    """
    pin_threads(threads)
    results = [EmbeddedSource(item) for item in items]
    reads = list(pool.map(lambda it: _read_one(it, storage), items))
    for res, (data, error) in zip(results, reads, strict=True):
        if error is not None:
            res.error = error
        else:
            res.content_sha256 = sha256_hex(data)
            res.file_size = len(data)

    def stored(res: EmbeddedSource) -> bool:
        ids = res.item.store_ids(res.content_sha256)
        if not all(store.has(i, res.content_sha256) for i in ids):
            return False
        if token_store is None or all(token_store.has(i, res.content_sha256) for i in ids):
            return True
        res.knn_stored = True
        return False

    todo = [r for r in results if r.ok]
    have = list(pool.map(stored, todo))
    compute = [r for r, h in zip(todo, have, strict=True) if not h]
    reuse = [r for r, h in zip(todo, have, strict=True) if h]
    for res in reuse:
        res.reused = True

    data_of = {id(r): d for r, (d, _) in zip(results, reads, strict=True)}
    min_edge = int((store.settings or {}).get("preprocess", {}).get("patch_size", 1))
    decoded = [
        pool.submit(_decode, r.item, data_of.pop(id(r)), max_pixels, min_edge) for r in compute
    ]

    def load(res: EmbeddedSource) -> None:
        ids = res.item.store_ids(res.content_sha256)
        if not load_features:
            res.image_size = tuple(store.attributes(ids[0])["image_size"])
            return
        for sid in ids:
            entry = store.get(sid)
            res.features.append(to_float32(entry.features))
            res.masks.append(store.foreground(entry) if masks else entry.mask)
            res.image_size = entry.image_size
            if token_store is not None:
                res.tokens.append(to_float32(token_store.get(sid).features))

    loading = [pool.submit(load, r) for r in reuse]
    if compute and not isinstance(model, Embedder):
        model = model()
    stores = (store, token_store)
    _compute(compute, decoded, stores, model, pool, keep_images, load_features, masks)
    for fut in loading:
        fut.result()
    return results


def _compute(
    compute: list[EmbeddedSource],
    decoded: list[Future],
    stores: tuple[EmbeddingStore, EmbeddingStore | None],
    model: Embedder,
    pool: ThreadPoolExecutor,
    keep_images: bool,
    load_features: bool,
    masks: bool,
) -> None:
    """Decode (pool) -> embed in batches (``compute_lock()``) -> float16 + mask + put (pool).

    A batch goes to the model as soon as its images are decoded, while the pool decodes the
    next ones; the pool finishes (float16, mask, store) each batch while the model runs the
    next. Those steps are single-threaded (``anomalydino_core.cpu.set_threads`` keeps BLAS at
    one thread) or wait on storage. Concurrent tasks (``runtime.concurrency``) can also overlap
    storage latency with the model where storage is remote.
    """
    if not compute:
        return
    if stores[1] is not None:  # FoundAD's tokens: torch runs the backbone whatever the runtime
        tune_allocator(model.extractor.device)
    waited = {"decode": 0.0, "lock": 0.0, "model": 0.0}

    def views() -> Iterator[tuple[EmbeddedSource, int, np.ndarray]]:
        for res, fut in zip(compute, decoded, strict=True):
            t = time.perf_counter()
            image, error = fut.result()
            waited["decode"] += time.perf_counter() - t
            if error is not None:
                res.error = error
                continue
            res.image_size = (int(image.shape[0]), int(image.shape[1]))
            if keep_images:
                res.image = image
            angles = res.item.angles
            n_views = 1 if angles is None else len(angles)
            res.features = [None] * n_views  # type: ignore[list-item]
            res.masks = [None] * n_views  # type: ignore[list-item]
            if stores[1] is not None:
                res.tokens = [None] * n_views  # type: ignore[list-item]
            for v in range(n_views):
                yield res, v, image if angles is None else rotate_image(image, angles[v])

    def embed(part: list[tuple[EmbeddedSource, int, np.ndarray]]) -> list[Future]:
        t = time.perf_counter()
        with compute_lock():
            t_locked = time.perf_counter()
            pixels = [px for _, _, px in part]
            if stores[1] is None:
                grids, tokens = model.extractor.embed(pixels), [None] * len(part)
            else:  # one backbone pass, both layers
                grids, tokens = embed_with_foundad(model.extractor, pixels)
        waited["lock"] += t_locked - t
        waited["model"] += time.perf_counter() - t_locked
        return [
            pool.submit(_finish_view, res, view, grid, token_grid, stores, model, masks)
            for (res, view, _), grid, token_grid in zip(part, grids, tokens, strict=True)
        ]

    batch = max(1, model.extractor.batch_size)
    writes: list[Future] = []
    part: list[tuple[EmbeddedSource, int, np.ndarray]] = []
    n_views = 0
    for view in views():
        part.append(view)
        n_views += 1
        if len(part) == batch:
            writes += embed(part)
            part = []
    if part:
        writes += embed(part)
    del part
    t_model = time.perf_counter()
    for fut in writes:
        fut.result()
    run_logger().debug(
        "embedded %d views: waiting for decoding %.2fs, for the model %.2fs, model %.2fs, "
        "float16 + mask + store (after the model) %.2fs",
        n_views,
        waited["decode"],
        waited["lock"],
        waited["model"],
        time.perf_counter() - t_model,
    )
    for res in compute:
        if res.ok and not load_features:
            res.features, res.masks, res.tokens = [], [], []


def _finish_view(
    res: EmbeddedSource,
    view: int,
    grid: np.ndarray,
    token_grid: np.ndarray | None,
    stores: tuple[EmbeddingStore, EmbeddingStore | None],
    model: Embedder,
    masks: bool,
) -> None:
    """Round to float16, compute the foreground mask (``masks``), store the view (and its
    tokens)."""
    store, token_store = stores
    sid = res.item.store_ids(res.content_sha256)[view]
    if token_store is not None:
        tokens16, finite = float16_checked(token_grid)
        if not finite:
            res.error = f"{res.item.image_id}: FoundAD tokens not finite in float16"
            return
        token_store.put(_entry(res, sid, tokens16, None))
        res.tokens[view] = to_float32(tokens16)
    if res.knn_stored:  # only the tokens were missing: the stored features stay as they are
        entry = store.get(sid)
        res.features[view] = to_float32(entry.features)
        res.masks[view] = store.foreground(entry) if masks else entry.mask
        return
    grid16, finite = float16_checked(grid)
    if not finite:
        res.error = f"{res.item.image_id}: features not finite in float16 (NaN/inf or overflow)"
        return
    widened = to_float32(grid16)
    # single-threaded BLAS (anomalydino_core.cpu.set_threads): no compute_lock() needed
    mask = foreground_mask(widened, threshold=model.mask_threshold) if masks else None
    store.put(_entry(res, sid, grid16, mask))
    res.features[view] = widened
    res.masks[view] = mask


def _entry(
    res: EmbeddedSource, sid: str, values: np.ndarray, mask: np.ndarray | None
) -> EmbeddedImage:
    return EmbeddedImage(
        image_id=sid,
        source_uri=res.item.uri,
        content_sha256=res.content_sha256,
        image_size=res.image_size,
        features=values,
        mask=mask,
    )
