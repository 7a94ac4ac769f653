"""Reference banks: built from one reference-set version, stored with their masking decision and
score threshold, loaded once per process.

A bank lives in ``banks/<product>/<version>/<bank_key>/``: ``index.faiss`` (the patch index,
faiss bytes) and ``bank.json`` (the manifest), written last, so a bank without ``bank.json`` does
not exist for readers. ``bank_key`` = feature key + a hash of everything else that shapes the bank
(shots, rotations, masking mode, image score, index kind, threshold rule).

The threshold rule (unless the product config fixes one) is
``anomalydino_core.thresholds.reference_threshold`` over leave-one-out scores of the references.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from anomalydino_core.augment import AGNOSTIC_ANGLES, MAX_ROTATION_ASPECT, bank_angles
from anomalydino_core.config import ScoringSettings
from anomalydino_core.few_shot import FewShotScorer
from anomalydino_core.masking import (
    MASKING_RULE,
    TESTED_REFERENCES,
    MaskingDecision,
    decide_masking,
    views_of_references,
)
from anomalydino_core.memory_bank import PatchIndex
from anomalydino_core.thresholds import (
    MIN_LOO_REFERENCES,
    effective_threshold,
    loo_sample,
    reference_threshold,
)
from tasks.embedding_store import EmbeddingStore
from tasks.models import compute_lock, pin_threads
from tasks.retry import TASK_RETRY_OPTIONS, run_logger, with_storage_retries
from tasks.storage import StorageConfig, atomic_write_bytes, exists, join, read_bytes

BANK_FORMAT = "anomalydino.bank/1"
MANIFEST = "bank.json"
INDEX = "index.faiss"


class BankError(ValueError):
    """A bank cannot be built (e.g. unreadable reference) or read; the message says why."""


def reference_angles(scoring: ScoringSettings) -> tuple[int, ...]:
    """Views embedded per reference: 8 rotations (agnostic) or the image as it is (informed)."""
    return AGNOSTIC_ANGLES if scoring.rotation == "agnostic" else (0,)


def bank_key(
    feature_key: str, scoring: ScoringSettings, shots: int | None, threshold_rule: dict
) -> str:
    """``<feature key>--<hash>`` of everything that shapes the bank and its derived threshold."""
    shaping = {
        "shots": shots,
        "angles": list(reference_angles(scoring)),
        "masking": scoring.masking,
        "masking_rule": MASKING_RULE,
        "min_loo_references": MIN_LOO_REFERENCES,
        "max_rotation_aspect": MAX_ROTATION_ASPECT,
        "mask_references": scoring.mask_references,
        "image_score": scoring.image_score,
        "sigma": scoring.sigma,
        "index": scoring.index,
        "threshold_rule": threshold_rule,
    }
    digest = hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:10]
    return f"{feature_key}--{digest}"


@dataclass(frozen=True)
class ReferenceImage:
    image_id: str  # path inside the reference version
    uri: str
    content_sha256: str
    image_size: tuple[int, int]


@dataclass(frozen=True)
class BankManifest:
    """Everything known about a bank; ``bank.json`` holds it."""

    uri: str
    product: str
    version: str
    key: str
    feature_key: str
    feature_settings: dict[str, Any]
    scoring: dict[str, Any]
    angles: tuple[int, ...]
    shots: int | None
    references: tuple[ReferenceImage, ...]
    bank_patches: int
    use_mask: bool
    masking_reason: str
    masking_evidence: dict[str, Any]
    threshold: float | None  # effective when built; None: none derived and none configured
    threshold_source: str  # "reference_loo" | "config" | "none"
    loo_threshold: float | None  # the leave-one-out rule's threshold (None: < 3 references)
    threshold_rule: dict[str, Any]
    loo_scores: dict[str, float] = field(default_factory=dict)
    threshold_reason: str = ""
    rotation_notes: dict[str, str] = field(default_factory=dict)  # reference -> views left out
    created_at: str = ""
    build_seconds: float = 0.0
    format: str = BANK_FORMAT

    @property
    def masking(self) -> MaskingDecision:
        """The masking decision with its evidence per tested view."""
        return MaskingDecision.from_dict(self.masking_evidence)

    @property
    def index_uri(self) -> str:
        return join(self.uri, INDEX)

    def to_json(self) -> str:
        d = asdict(self)
        d["angles"] = list(self.angles)
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, uri: str) -> BankManifest:
        d = json.loads(text)
        if d.get("format") != BANK_FORMAT:
            raise BankError(f"{uri}: not a bank manifest (format {d.get('format')!r})")
        d["uri"] = uri
        d["angles"] = tuple(d["angles"])
        d["references"] = tuple(
            ReferenceImage(r["image_id"], r["uri"], r["content_sha256"], tuple(r["image_size"]))
            for r in d["references"]
        )
        return cls(**d)


def _scorer(scoring: ScoringSettings) -> FewShotScorer:
    return FewShotScorer(
        image_score_method=scoring.image_score, sigma=scoring.sigma, index_kind=scoring.index
    )


def fit_bank(
    views: Sequence[Sequence[np.ndarray]],
    masks: Sequence[Sequence[np.ndarray]],
    image_sizes: Sequence[tuple[int, int]],
    *,
    scoring: ScoringSettings,
    mask_threshold: float,
    loo_max_references: int,
    masking_views: Sequence[tuple[str, np.ndarray]],
    angles: tuple[int, ...],
    log: Any = None,
) -> tuple[FewShotScorer, MaskingDecision, list[tuple[int, float]], dict[int, str]]:
    """Masking decision, the full bank, and leave-one-out scores.

    ``views[r]`` are the (float32) grids of reference r, the unrotated view first; ``masks[r]``
    their foreground masks; ``masking_views`` the masking test's named views (the tested
    references in 8 rotations); ``angles`` the angle of each of ``views[r]``. Returns (fitted
    scorer, decision, [(r, loo score)], {r: why some of its rotations were left out}).
    """
    decision = decide_masking(scoring.masking, masking_views, threshold=mask_threshold)
    use_mask = decision.use_mask
    views, masks, rotation_notes = _bank_views(views, masks, image_sizes, angles)

    def bank_masks(refs: Sequence[int]) -> list[np.ndarray] | None:
        if not (use_mask and scoring.mask_references):
            return None
        return [m for r in refs for m in masks[r]]

    everyone = list(range(len(views)))
    scorer = _scorer(scoring).fit([g for r in everyone for g in views[r]], bank_masks(everyone))
    loo: list[tuple[int, float]] = []
    if len(views) >= 2:
        for r in loo_sample(len(views), loo_max_references):
            others = [o for o in everyone if o != r]
            held_out = _scorer(scoring).fit(
                [g for o in others for g in views[o]], bank_masks(others)
            )
            result = held_out.score(
                views[r][0],
                image_size=image_sizes[r],
                foreground=masks[r][0] if use_mask else None,
                with_map=scoring.image_score == "max_map",
            )
            loo.append((r, float(result.score)))
            if log is not None:
                log.debug("leave-one-out score of reference %d: %.4f", r, result.score)
    return scorer, decision, loo, rotation_notes


def _bank_views(views, masks, image_sizes, angles):
    """Each reference's views restricted to ``bank_angles`` (non-square: 0 and 180 only)."""
    kept_views, kept_masks, notes = [], [], {}
    for r, size in enumerate(image_sizes):
        kept, why = bank_angles(tuple(size), tuple(angles))
        keep = [i for i, a in enumerate(angles) if a in kept]
        kept_views.append([views[r][i] for i in keep])
        kept_masks.append([masks[r][i] for i in keep])
        if why:
            notes[r] = why
    return kept_views, kept_masks, notes


def write_bank(
    manifest: BankManifest, scorer: FewShotScorer, storage: StorageConfig | None
) -> None:
    """Index first, manifest last (the manifest is the completion flag)."""
    with_storage_retries(
        lambda: atomic_write_bytes(manifest.index_uri, scorer.index.to_bytes(), storage),
        what=f"write {manifest.index_uri}",
    )
    with_storage_retries(
        lambda: atomic_write_bytes(
            join(manifest.uri, MANIFEST), manifest.to_json().encode(), storage
        ),
        what=f"write {manifest.uri}/{MANIFEST}",
    )


def read_manifest(uri: str, storage: StorageConfig | None) -> BankManifest | None:
    """The manifest of the bank at ``uri``, or None if there is no complete bank."""
    path = join(uri, MANIFEST)
    try:
        text = with_storage_retries(lambda: read_bytes(path, storage), what=f"read {path}")
    except FileNotFoundError:
        return None
    return BankManifest.from_json(text.decode(), uri)


def bank_exists(uri: str, storage: StorageConfig | None) -> bool:
    return exists(join(uri, MANIFEST), storage)


@functools.lru_cache(maxsize=8)
def _load_scorer(index_uri: str, scoring_json: str, storage: StorageConfig | None) -> FewShotScorer:
    scoring = ScoringSettings.model_validate_json(scoring_json)
    data = with_storage_retries(lambda: read_bytes(index_uri, storage), what=f"read {index_uri}")
    scorer = _scorer(scoring)
    scorer.index = PatchIndex.from_bytes(data, scoring.index)
    return scorer


def load_scorer(manifest: BankManifest, storage: StorageConfig | None) -> FewShotScorer:
    """The bank's scorer, read once per process (banks are immutable once complete)."""
    scoring = ScoringSettings.model_validate(manifest.scoring)
    return _load_scorer(manifest.index_uri, scoring.model_dump_json(), storage)


# ------------------------------------------------------------------------------ Prefect task


@task(
    name="fit-bank",
    **TASK_RETRY_OPTIONS,
    cache_policy=NO_CACHE,
)
def fit_and_write_bank(
    *,
    bank_uri: str,
    product: str,
    version: str,
    key: str,
    feature_key: str,
    store_uri: str,
    store_settings: dict,
    references: list[ReferenceImage],
    scoring: ScoringSettings,
    shots: int | None,
    mask_threshold: float,
    configured_threshold: float | None,
    threshold_rule: dict,
    threads: int,
    io_threads: int,
    storage_settings,
) -> BankManifest:
    """Load the reference views from the store, fit the bank, derive the threshold, write it."""
    t0 = time.perf_counter()
    logger = run_logger()
    pin_threads(threads)
    storage = storage_settings.storage_config()
    store = EmbeddingStore.open(store_uri, store_settings, storage, create=False, read_only=True)
    angles = reference_angles(scoring)

    def load(ref: ReferenceImage, at: Sequence[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        feats, masks = [], []
        for a in at:
            entry = store.get(f"references/{ref.content_sha256}/rot{a:03d}")
            feats.append(entry.features.astype(np.float32))
            masks.append(store.foreground(entry))
        return feats, masks

    tested = references[:TESTED_REFERENCES]
    with ThreadPoolExecutor(io_threads) as pool:
        loaded = list(pool.map(lambda r: load(r, angles), references))
        if angles != AGNOSTIC_ANGLES:  # informed: the test still looks at 8 rotations
            rotated = list(pool.map(lambda r: load(r, AGNOSTIC_ANGLES)[0], tested))
        else:
            rotated = [feats for feats, _ in loaded[: len(tested)]]
    views = [f for f, _ in loaded]
    masks = [m for _, m in loaded]
    masking_views = views_of_references(rotated, AGNOSTIC_ANGLES, [r.image_id for r in tested])
    with compute_lock():
        scorer, decision, loo, rotation_notes = fit_bank(
            views,
            masks,
            [r.image_size for r in references],
            scoring=scoring,
            mask_threshold=mask_threshold,
            loo_max_references=threshold_rule["loo_max_references"],
            masking_views=masking_views,
            angles=angles,
            log=logger,
        )
    loo_scores = {references[r].image_id: s for r, s in loo}
    derived = reference_threshold(
        [s for _, s in loo],
        sigmas=threshold_rule["loo_sigmas"],
        margin=threshold_rule["loo_margin"],
    )
    threshold, source = effective_threshold(configured_threshold, derived.value)
    threshold_reason = "set in the product config" if source == "config" else derived.reason
    if threshold is None:
        logger.warning("%s %s: no threshold: %s", product, version, derived.reason)
    manifest = BankManifest(
        uri=bank_uri,
        product=product,
        version=version,
        key=key,
        feature_key=feature_key,
        feature_settings=store_settings,
        scoring=scoring.model_dump(mode="json"),
        angles=angles,
        shots=shots,
        references=tuple(references),
        bank_patches=int(scorer.bank_size),
        use_mask=bool(decision.use_mask),
        masking_reason=decision.reason,
        masking_evidence=decision.to_dict(),
        threshold=threshold,
        threshold_source=source,
        threshold_rule=threshold_rule,
        loo_threshold=derived.value,
        threshold_reason=threshold_reason,
        rotation_notes={references[r].image_id: why for r, why in rotation_notes.items()},
        loo_scores=loo_scores,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        build_seconds=round(time.perf_counter() - t0, 3),
    )
    write_bank(manifest, scorer, storage)
    for image_id, why in manifest.rotation_notes.items():
        logger.info("bank %s: reference %s: %s", bank_uri, image_id, why)
    logger.info(
        "bank %s: %d patches from %d references x %d views; masking %s (%s); threshold %s (%s)",
        bank_uri,
        manifest.bank_patches,
        len(references),
        len(angles),
        "on" if decision.use_mask else "off",
        decision.reason,
        "n/a" if threshold is None else f"{threshold:.4f}",
        source,
    )
    return manifest
