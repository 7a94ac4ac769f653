"""FoundAD projectors, stored beside the bank they were trained for.

A projector lives in ``<bank>/foundad/<projector_key>/``: ``projector-<sha256[:16]>.safetensors``
(the weights, named by their content, so that two runs training the same projector at once never
overwrite each other's weights: each ``projector.json`` names its own) and ``projector.json`` (:class:`ProjectorManifest`: backbone identity and layer, every
training and scoring setting, the seed, the loss curve, why training stopped, its time, the
held-out scores and the threshold derived from them), written last, so a projector without
``projector.json`` does not exist for readers. ``projector_key`` hashes the token identity
(backbone, weights, preprocessing, layer) and the FoundAD settings; a new reference version has
a new bank, so it trains a new projector.

A stored projector is used only when its JSON names the backbone, layer and settings asked for
and its weights have the sha256 the JSON records; otherwise it is refused with the differences
named (:class:`ProjectorMismatchError`), never silently used.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from anomalydino_core.foundad.config import FoundADConfig
from anomalydino_core.foundad.projector import ManifoldProjector, ProjectorConfig
from anomalydino_core.foundad.trained import TrainedProjector, projector_from_bytes
from tasks.retry import with_storage_retries
from tasks.storage import StorageConfig, join, read_bytes

PROJECTOR_FORMAT = "anomalydino.foundad_projector/1"
MANIFEST = "projector.json"
#: what must match between a stored projector and the one a run asks for
IDENTITY_FIELDS = ("token_key", "backbone", "weights_sha256", "layer", "config")


class ProjectorError(ValueError):
    """A projector cannot be trained, read or used; the message says why."""


class ProjectorMismatchError(ProjectorError):
    """A stored projector was made for another backbone, layer or settings."""


def projector_key(token_key: str, config: FoundADConfig) -> str:
    """``foundad-<hash>`` of the token identity and every FoundAD setting."""
    shaping = {"token_key": token_key, "config": config.to_dict()}
    digest = hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:12]
    return f"foundad-{digest}"


def projector_uri(bank_uri: str, key: str) -> str:
    return join(bank_uri, "foundad", key)


def weights_file(sha256: str) -> str:
    """The weights' file name: their content hash (see the module docstring)."""
    return f"projector-{sha256[:16]}.safetensors"


@dataclass(frozen=True)
class ProjectorManifest:
    """Everything known about a stored projector; ``projector.json`` holds it."""

    uri: str
    product: str
    version: str
    bank_key: str
    key: str
    token_key: str  # the FoundAD token store's feature key
    backbone: str
    weights_sha256: str  # of the backbone
    layer: str
    embed_dim: int
    config: dict[str, Any]  # FoundADConfig.to_dict()
    references: list[dict[str, str]]  # image_id, content_sha256
    cutpaste_on_foreground: bool
    history: list[dict[str, float]]  # epoch, train_loss, val_loss, seconds
    best_epoch: int
    stopped_by: str
    precision: str
    train_seconds: float
    held_out_normal_scores: list[float]
    held_out_anomaly_scores: list[float]
    derived_threshold: float | None
    threshold_reason: str
    projector_sha256: str  # of the weights file
    n_parameters: int
    created_at: str = ""
    format: str = PROJECTOR_FORMAT

    @property
    def weights_file(self) -> str:
        return weights_file(self.projector_sha256)

    @property
    def weights_uri(self) -> str:
        return join(self.uri, self.weights_file)

    def identity(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in IDENTITY_FIELDS}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, uri: str) -> ProjectorManifest:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ProjectorError(f"{uri}/{MANIFEST}: not JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != PROJECTOR_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ProjectorError(f"{uri}/{MANIFEST}: not a projector manifest (format {found!r})")
        data["uri"] = uri
        try:
            return cls(**data)
        except TypeError as exc:
            raise ProjectorError(f"{uri}/{MANIFEST}: {exc}") from None


def manifest_of(
    trained: TrainedProjector,
    *,
    uri: str,
    product: str,
    version: str,
    bank_key: str,
    key: str,
    identity: dict[str, Any],
    references: list[dict[str, str]],
    cutpaste_on_foreground: bool,
    train_seconds: float,
    derived_threshold: float | None,
    threshold_reason: str,
    projector_sha256: str,
    n_parameters: int,
    created_at: str,
) -> ProjectorManifest:
    """The manifest of a freshly trained projector (``identity``: see ``IDENTITY_FIELDS``)."""
    result = trained.training
    return ProjectorManifest(
        uri=uri,
        product=product,
        version=version,
        bank_key=bank_key,
        key=key,
        token_key=identity["token_key"],
        backbone=identity["backbone"],
        weights_sha256=identity["weights_sha256"],
        layer=identity["layer"],
        embed_dim=trained.embed_dim,
        config=identity["config"],
        references=references,
        cutpaste_on_foreground=cutpaste_on_foreground,
        history=[asdict(h) for h in result.history],
        best_epoch=result.best_epoch,
        stopped_by=result.stopped_by,
        precision=result.precision,
        train_seconds=round(train_seconds, 3),
        held_out_normal_scores=[float(s) for s in trained.held_out_normal_scores],
        held_out_anomaly_scores=[float(s) for s in trained.held_out_anomaly_scores],
        derived_threshold=derived_threshold,
        threshold_reason=threshold_reason,
        projector_sha256=projector_sha256,
        n_parameters=n_parameters,
        created_at=created_at,
    )


def check_identity(manifest: ProjectorManifest, wanted: dict[str, Any]) -> None:
    """Raise :class:`ProjectorMismatchError` naming every field where ``manifest`` differs."""
    stored = manifest.identity()
    differ = [name for name in IDENTITY_FIELDS if stored.get(name) != wanted.get(name)]
    if not differ:
        return
    parts = []
    for name in differ:
        if name == "config":
            parts.append(f"settings: {_dict_diff(stored['config'], wanted['config'])}")
        else:
            parts.append(f"{name}: stored {stored.get(name)!r}, asked {wanted.get(name)!r}")
    raise ProjectorMismatchError(
        f"projector {manifest.uri} was trained for another model or settings, refused "
        f"({'; '.join(parts)}); train a new one (anomalydino build-bank --force)"
    )


def _dict_diff(stored: Any, wanted: Any, path: str = "") -> str:
    if isinstance(stored, dict) and isinstance(wanted, dict):
        keys = sorted(set(stored) | set(wanted))
        parts = [
            _dict_diff(stored.get(k), wanted.get(k), f"{path}{k}.")
            for k in keys
            if stored.get(k) != wanted.get(k)
        ]
        return ", ".join(parts)
    return f"{path.rstrip('.')} stored {stored!r}, asked {wanted!r}"


def read_projector_manifest(uri: str, storage: StorageConfig | None) -> ProjectorManifest | None:
    """The manifest of the projector at ``uri``, or None if there is no complete projector."""
    path = join(uri, MANIFEST)
    try:
        text = with_storage_retries(lambda: read_bytes(path, storage), what=f"read {path}")
    except FileNotFoundError:
        return None
    return ProjectorManifest.from_json(text.decode(), uri)


@functools.lru_cache(maxsize=4)
def _load(weights_uri: str, sha256: str, config_json: str, storage) -> ManifoldProjector:
    data = with_storage_retries(
        lambda: read_bytes(weights_uri, storage), what=f"read {weights_uri}"
    )
    found = hashlib.sha256(data).hexdigest()
    if found != sha256:
        raise ProjectorError(
            f"{weights_uri}: content sha256 {found[:12]}... differs from the {sha256[:12]}... "
            "its projector.json records (corrupted or replaced): refused"
        )
    try:
        return projector_from_bytes(data, ProjectorConfig(**json.loads(config_json)))
    except ValueError as exc:
        raise ProjectorError(f"{weights_uri}: {exc}") from None


def load_projector(manifest: ProjectorManifest, storage: StorageConfig | None) -> ManifoldProjector:
    """The stored projector, its bytes checked against the manifest (read once per process)."""
    config = FoundADConfig.from_dict(manifest.config).training.projector_config(manifest.embed_dim)
    return _load(
        manifest.weights_uri,
        manifest.projector_sha256,
        json.dumps(config.to_dict(), sort_keys=True),
        storage,
    )
