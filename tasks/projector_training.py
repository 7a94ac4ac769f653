"""The ``train-projector`` task: a product's FoundAD projector, trained on its bank's references.

It reads the bank's reference images (each checked against the content sha256 the bank
recorded: a reference changed since is an error naming it), places CutPaste anomalies on the
object when the bank's masking decision is on (the stored foreground masks), trains with the
process's backbone under ``compute_lock()``, derives the threshold from the held-out normal
scores and writes the weights (``tasks.projector``) then ``projector.json``.
"""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from anomalydino_core.config import ModelSettings
from anomalydino_core.foundad.config import FoundADConfig
from anomalydino_core.foundad.features import foundad_encoder, foundad_layer
from anomalydino_core.foundad.projector import count_parameters
from anomalydino_core.foundad.trained import projector_bytes, train_with_held_out
from anomalydino_core.images import decode_image
from anomalydino_core.thresholds import held_out_threshold
from tasks.bank import BankManifest, ReferenceImage
from tasks.embed import sha256_hex
from tasks.embedding_store import EmbeddingStore
from tasks.models import Embedder, compute_lock, embedder, pin_threads
from tasks.projector import (
    MANIFEST,
    ProjectorError,
    ProjectorManifest,
    manifest_of,
    projector_key,
    projector_uri,
)
from tasks.retry import TASK_RETRY_OPTIONS, run_logger, with_storage_retries
from tasks.storage import atomic_write_bytes, join, read_bytes


def foundad_identity(model: Embedder, token_key: str, config: FoundADConfig) -> dict[str, Any]:
    """What a stored projector must match (``tasks.projector.IDENTITY_FIELDS``), as JSON."""
    identity = {
        "token_key": token_key,
        "backbone": model.settings["backbone"],
        "weights_sha256": model.settings["weights_sha256"],
        "layer": foundad_layer(model.extractor),
        "config": config.to_dict(),
    }
    return json.loads(json.dumps(identity, sort_keys=True))


@task(name="train-projector", **TASK_RETRY_OPTIONS, cache_policy=NO_CACHE)
def train_projector(
    *,
    bank: BankManifest,
    model_settings: ModelSettings,
    store_uri: str,
    token_key: str,
    config: FoundADConfig,
    threshold_rule: dict[str, Any],
    threads: int,
    io_threads: int,
    max_pixels: int,
    storage_settings,
) -> ProjectorManifest:
    """Train the projector of ``bank`` and store it beside it (see the module docstring)."""
    t0 = time.perf_counter()
    log = run_logger()
    storage = storage_settings.storage_config()
    pin_threads(threads)
    model = embedder(model_settings, storage)
    if model.settings != bank.feature_settings:
        raise ProjectorError(
            f"this process's model ({model.key}) is not the one bank {bank.uri} was built with "
            f"({bank.feature_key}): same weights and software on every worker, please"
        )
    identity = foundad_identity(model, token_key, config)
    key = projector_key(token_key, config)
    uri = projector_uri(bank.uri, key)
    refs = list(bank.references)

    def read(ref: ReferenceImage) -> np.ndarray:
        data = with_storage_retries(lambda: read_bytes(ref.uri, storage), what=f"read {ref.uri}")
        if sha256_hex(data) != ref.content_sha256:
            raise ProjectorError(
                f"product {bank.product!r} version {bank.version!r}: reference {ref.image_id} "
                f"changed since the bank was built (content sha256 {sha256_hex(data)[:12]}... "
                f"!= {ref.content_sha256[:12]}...): rebuild the bank (build-bank --force)"
            )
        return decode_image(data, ref.image_id, max_pixels=max_pixels)

    with ThreadPoolExecutor(io_threads, thread_name_prefix="projector-io") as pool:
        images = list(pool.map(read, refs))
    foregrounds = None
    if bank.use_mask:  # objects: CutPaste lands on the object (the bank's stored masks)
        store = EmbeddingStore.open(store_uri, bank.feature_settings, storage, create=False)
        foregrounds = [
            store.foreground(store.get(f"references/{ref.content_sha256}/rot000")) for ref in refs
        ]

    def progress(epoch: int, train: float, val: float, eta: float) -> None:
        log.info(
            "%s %s FoundAD epoch %d/%d: train loss %.4f, held-out loss %.4f, ETA %.0fs",
            bank.product,
            bank.version,
            epoch,
            config.training.max_epochs,
            train,
            val,
            eta,
        )

    log.info(
        "training the FoundAD projector of %s %s on %d reference(s) (%s), at most %d epochs / %s s",
        bank.product,
        bank.version,
        len(refs),
        identity["layer"],
        config.training.max_epochs,
        config.training.max_seconds,
    )
    with compute_lock():
        trained = train_with_held_out(
            images,
            foundad_encoder(model.extractor),
            config,
            foregrounds=foregrounds,
            progress=progress,
        )
    del images
    derived = held_out_threshold(
        trained.held_out_normal_scores,
        sigmas=threshold_rule["loo_sigmas"],
        margin=threshold_rule["loo_margin"],
    )
    data = projector_bytes(trained.projector)
    manifest = manifest_of(
        trained,
        uri=uri,
        product=bank.product,
        version=bank.version,
        bank_key=bank.key,
        key=key,
        identity=identity,
        references=[{"image_id": r.image_id, "content_sha256": r.content_sha256} for r in refs],
        cutpaste_on_foreground=foregrounds is not None,
        train_seconds=time.perf_counter() - t0,
        derived_threshold=derived.value,
        threshold_reason=derived.reason,
        projector_sha256=hashlib.sha256(data).hexdigest(),
        n_parameters=count_parameters(trained.projector),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    with_storage_retries(
        lambda: atomic_write_bytes(manifest.weights_uri, data, storage),
        what=f"write {manifest.weights_uri}",
    )
    with_storage_retries(  # the manifest last: it is the completion flag
        lambda: atomic_write_bytes(join(uri, MANIFEST), manifest.to_json().encode(), storage),
        what=f"write {uri}/{MANIFEST}",
    )
    log.info(
        "projector %s: %d epochs (best %d, stopped by %s) in %.0fs; held-out normal scores "
        "%.4f-%.4f, CutPaste %.4f-%.4f; threshold %s (%s)",
        uri,
        len(manifest.history),
        manifest.best_epoch,
        manifest.stopped_by,
        manifest.train_seconds,
        min(manifest.held_out_normal_scores),
        max(manifest.held_out_normal_scores),
        min(manifest.held_out_anomaly_scores),
        max(manifest.held_out_anomaly_scores),
        "n/a" if derived.value is None else f"{derived.value:.4f}",
        derived.reason,
    )
    return manifest
