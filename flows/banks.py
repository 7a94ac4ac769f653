"""The model and bank context of a run: the resolved model, reference versions and images, the
product's bank (found or built), and the run context handed to every task."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from anomalydino_core.augment import AGNOSTIC_ANGLES
from anomalydino_core.foundad.features import foundad_layer
from anomalydino_core.masking import TESTED_REFERENCES
from flows.config import PipelineConfig
from flows.progress import Progress, gather
from flows.runtime import (
    artifact_key,
    chunked,
    current_flow_run_id,
    markdown_table,
    new_run_id,
    publish_markdown,
)
from tasks.bank import (
    BankError,
    BankManifest,
    ReferenceImage,
    bank_key,
    fit_and_write_bank,
    read_manifest,
    reference_angles,
)
from tasks.embed import SourceImage
from tasks.embed_images import EmbedSummary, embed_images
from tasks.layout import latest_version, relative_id
from tasks.listing import ImageListing, list_image_files
from tasks.models import default_threads, embedder, feature_key
from tasks.projector import (
    ProjectorManifest,
    check_identity,
    projector_key,
    projector_uri,
    read_projector_manifest,
)
from tasks.projector_training import foundad_identity, train_projector
from tasks.retry import TASK_RETRY_OPTIONS, run_logger
from tasks.run_context import RunContext
from tasks.storage import list_dirs


@dataclass(frozen=True)
class ResolvedModel:
    """The resolved model of a run: its feature settings, their key, the store, the threads."""

    settings: dict[str, Any]
    key: str
    store_uri: str
    threads: int
    mask_threshold: float
    token_settings: dict[str, Any]  # the FoundAD token store: the features' + the layer
    token_key: str
    token_store_uri: str


def embed_chunks(
    chunks: list[list[SourceImage]],
    resolved: ResolvedModel,
    cfg: PipelineConfig,
    what: str,
    *,
    masks: bool = True,
) -> list[EmbedSummary]:
    """Embed each chunk of images into the resolved model's store (one ``embed_images`` task per
    chunk, progress shown as ``what``); the tasks' summaries, in chunk order."""
    futures = [
        embed_images.submit(
            chunk,
            resolved.store_uri,
            resolved.settings,
            cfg.model,
            resolved.threads,
            cfg.runtime.io_threads,
            cfg.storage,
            masks=masks,
        )
        for chunk in chunks
    ]
    with Progress(sum(len(c) for c in chunks), what) as progress:
        return gather(futures, [len(c) for c in chunks], progress)


def resolve_model(cfg: PipelineConfig, product: str) -> ResolvedModel:
    """Load the model once in the flow process (tasks here reuse it) and resolve its identity."""
    model = embedder(cfg.model, cfg.storage_config())
    token_settings = dict(model.settings, foundad_layer=foundad_layer(model.extractor))
    token_key = feature_key(token_settings)
    return ResolvedModel(
        settings=model.settings,
        key=model.key,
        store_uri=cfg.layout().embeddings(product, model.key),
        threads=default_threads(cfg.model),
        mask_threshold=model.mask_threshold,
        token_settings=token_settings,
        token_key=token_key,
        token_store_uri=cfg.layout().embeddings(product, f"{token_key}-foundad"),
    )


def run_context(
    cfg: PipelineConfig,
    resolved: ResolvedModel,
    product: str,
    lot: str,
    *,
    method: str,
    started,
    threshold: float | None,
    threshold_source: str,
    use_mask: bool,
    **extra: Any,
) -> RunContext:
    """What every task of one (product, lot, run) needs; a new run id (time + flow run)."""
    flow_run_id = current_flow_run_id()
    run_id = new_run_id(started, flow_run_id)
    layout = cfg.layout()
    return RunContext(
        product=product,
        lot=lot,
        run_id=run_id,
        flow_run_id=flow_run_id,
        method=method,
        run_started_at=started,
        store_uri=resolved.store_uri,
        store_settings=resolved.settings,
        maps_uri=layout.map_archive(product, lot, run_id),
        overlays_uri=layout.overlays(product, lot, run_id),
        model=cfg.model,
        storage=cfg.storage,
        threads=resolved.threads,
        io_threads=cfg.runtime.io_threads,
        threshold=threshold,
        threshold_source=threshold_source,
        use_mask=use_mask,
        **extra,
    )


@task(
    name="list-images",
    **TASK_RETRY_OPTIONS,
    cache_policy=NO_CACHE,
)
def list_images(prefix: str, storage_settings, scope: str = "the lot") -> ImageListing:
    """Image URIs under ``prefix`` (recursive, sorted) and the refused ones (symbolic links out
    of it); every other file is named in the log and ignored (``tasks.listing``)."""
    return list_image_files(prefix, storage_settings, run_logger(), scope)


def reference_versions(cfg: PipelineConfig, product: str) -> list[str]:
    return list_dirs(cfg.layout().product_references(product), cfg.storage_config())


def resolve_version(cfg: PipelineConfig, product: str, version: str | None) -> str:
    versions = reference_versions(cfg, product)
    if version is None:
        version = latest_version(versions)
        if version is None:
            raise BankError(
                f"product {product!r}: no reference versions under "
                f"{cfg.layout().product_references(product)}"
            )
    elif version not in versions:
        raise BankError(
            f"product {product!r}: no reference version {version!r} "
            f"(found: {', '.join(versions) or 'none'})"
        )
    return version


def threshold_rule(cfg: PipelineConfig) -> dict[str, Any]:
    return cfg.thresholds.model_dump(
        include={"loo_sigmas", "loo_margin", "loo_max_references"}, mode="json"
    )


def prepare_bank(
    cfg: PipelineConfig,
    product: str,
    resolved: ResolvedModel,
    version: str | None = None,
    *,
    force: bool = False,
) -> BankManifest:
    """The bank of ``product``/``version`` for this model, built (inside the current flow) if
    it does not exist yet or ``force``."""
    log = run_logger()
    storage = cfg.storage_config()
    layout = cfg.layout()
    version = resolve_version(cfg, product, version)
    scoring = cfg.scoring_for(product)
    psettings = cfg.product(product)
    rule = threshold_rule(cfg)
    key = bank_key(resolved.key, scoring, psettings.shots, rule)
    uri = layout.bank(product, version, key)
    if not force:
        existing = read_manifest(uri, storage)
        if existing is not None:
            log.info("bank %s exists (%d patches), reusing it", uri, existing.bank_patches)
            return existing

    prefix = layout.reference_version(product, version)
    listing = list_images(prefix, cfg.storage, "the reference set")
    uris = listing.uris
    if listing.refused:
        raise BankError(
            f"product {product!r} version {version!r}: fix the reference set: "
            + "; ".join(f"{relative_id(prefix, u)}: {why}" for u, why in listing.refused.items())
        )
    if psettings.shots is not None:
        if len(uris) < psettings.shots:
            raise BankError(
                f"product {product!r} version {version!r}: {len(uris)} reference images, "
                f"the product config asks for shots={psettings.shots}"
            )
        uris = uris[: psettings.shots]
    if not uris:
        raise BankError(f"product {product!r} version {version!r}: no images under {prefix}")
    angles = reference_angles(scoring)
    # the masking test looks at the first references in 8 rotations, whatever the bank uses
    items = [
        SourceImage(
            relative_id(prefix, u),
            u,
            "references/{sha256}",
            AGNOSTIC_ANGLES if i < TESTED_REFERENCES else angles,
        )
        for i, u in enumerate(uris)
    ]
    log.info(
        "building bank %s: %d references x %d views (%s)",
        uri,
        len(items),
        len(angles),
        resolved.key,
    )
    chunks = chunked(items, max(1, cfg.runtime.chunk_size // len(angles)))
    summaries = embed_chunks(
        chunks, resolved, cfg, f"embedding the references of {product}/{version}"
    )
    uri_of = {it.image_id: it.uri for it in items}
    references: list[ReferenceImage] = []
    errors: list[str] = []
    for s in summaries:
        for image_id, sha, size, error in zip(
            s.image_ids, s.content_sha256, s.image_sizes, s.errors, strict=True
        ):
            if error is not None:
                errors.append(error)
            else:
                references.append(ReferenceImage(image_id, uri_of[image_id], sha, size))
    if errors:
        raise BankError(
            f"product {product!r} version {version!r}: {len(errors)} unreadable reference "
            f"image(s); fix the reference set: " + "; ".join(errors)
        )
    manifest = fit_and_write_bank(
        bank_uri=uri,
        product=product,
        version=version,
        key=key,
        feature_key=resolved.key,
        store_uri=resolved.store_uri,
        store_settings=resolved.settings,
        references=references,
        scoring=scoring,
        shots=psettings.shots,
        mask_threshold=resolved.mask_threshold,
        configured_threshold=psettings.threshold,
        threshold_rule=rule,
        threads=resolved.threads,
        io_threads=cfg.runtime.io_threads,
        storage_settings=cfg.storage,
    )
    n_reused = sum(s.n_reused for s in summaries)
    publish_markdown(
        bank_markdown(manifest, n_reused),
        artifact_key("bank", product, version),
        f"reference bank {product} {version}",
    )
    return manifest


def foundad_config(cfg: PipelineConfig, product: str):
    """The product's FoundAD configuration (seed 0: one projector per bank and settings)."""
    return cfg.foundad.config(cfg.model, cfg.scoring_for(product), seed=0)


def prepare_projector(
    cfg: PipelineConfig,
    product: str,
    resolved: ResolvedModel,
    bank: BankManifest,
    *,
    force: bool = False,
) -> ProjectorManifest | None:
    """The FoundAD projector of ``bank`` when the product's scorer uses it (else None): the
    stored one, checked against this model and settings, or one trained now."""
    if cfg.scoring_for(product).scorer == "knn":
        return None
    log = run_logger()
    storage = cfg.storage_config()
    config = foundad_config(cfg, product)
    identity = foundad_identity(embedder(cfg.model, storage), resolved.token_key, config)
    uri = projector_uri(bank.uri, projector_key(resolved.token_key, config))
    if not force:
        existing = read_projector_manifest(uri, storage)
        if existing is not None:
            check_identity(existing, identity)
            log.info(
                "projector %s exists (trained in %.0fs), reusing it", uri, existing.train_seconds
            )
            return existing
    manifest = train_projector(
        bank=bank,
        model_settings=cfg.model,
        store_uri=resolved.store_uri,
        token_key=resolved.token_key,
        config=config,
        threshold_rule=threshold_rule(cfg),
        threads=resolved.threads,
        io_threads=cfg.runtime.io_threads,
        max_pixels=cfg.model.decode_max_pixels,
        storage_settings=cfg.storage,
    )
    publish_markdown(
        projector_markdown(manifest),
        artifact_key("projector", product, bank.version),
        f"FoundAD projector {product} {bank.version}",
    )
    return manifest


def projector_markdown(m: ProjectorManifest) -> str:
    curve = markdown_table(
        ["epoch", "train loss", "held-out loss", "seconds"],
        [
            [h["epoch"], f"{h['train_loss']:.4f}", f"{h['val_loss']:.4f}", f"{h['seconds']:.0f}"]
            for h in m.history
        ],
    )
    thr = "none" if m.derived_threshold is None else f"{m.derived_threshold:.4f}"
    return (
        f"## FoundAD projector {m.product} / {m.version}\n\n"
        f"{len(m.references)} reference(s), {m.layer}, {m.n_parameters:,} parameters; "
        f"best epoch {m.best_epoch}, stopped by {m.stopped_by}, {m.train_seconds:.0f}s. "
        f"Threshold {thr}: {m.threshold_reason}. Projector: `{m.uri}`.\n\n{curve}\n"
    )


def bank_markdown(m: BankManifest, n_reused_refs: int = 0) -> str:
    head = markdown_table(
        ["product", "version", "references", "views", "patches", "masking", "threshold", "source"],
        [
            [
                m.product,
                m.version,
                len(m.references),
                len(m.angles),
                m.bank_patches,
                "on" if m.use_mask else "off",
                m.threshold,
                m.threshold_source,
            ]
        ],
    )
    loo = markdown_table(["reference", "leave-one-out score"], sorted(m.loo_scores.items()))
    return (
        f"## Bank {m.product} / {m.version}\n\n{head}\n\n"
        f"Masking: {m.masking_reason} (rule {m.masking.rule}). Bank: `{m.uri}`. "
        "Reference embeddings reused: "
        f"{n_reused_refs}.\n\n{loo}\n"
    )
