"""The one pipeline configuration: shared by the CLI, the flows and the prefect.yaml deployments.

Sources, later ones win: defaults < YAML/JSON file (``--config`` or ``$ANOMALYDINO_CONFIG``) <
environment (``ANOMALYDINO_ROOT``, ``ANOMALYDINO_INCOMING``, ``ANOMALYDINO_REFERENCES``,
``ANOMALYDINO_DASK_ADDRESS``) < explicit overrides (CLI flags, flow parameters).

Storage credentials are never part of it: they come from the usual AWS variables
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``), an AWS profile (``storage.profile``) or the
instance role, so a config can be stored as a flow parameter or printed without leaking secrets.
A config that holds some anyway (a URI with ``user:password@``, a secret-like option in
``storage.client_kwargs``) is refused with an error naming the field, never echoing its value.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from anomalydino_core.choices import MaskingMode, Rotation, Scorer
from anomalydino_core.config import FoundADSettings, ModelSettings, ScoringSettings
from tasks.layout import Layout, check_name
from tasks.storage import (
    CREDENTIALS_HINT,
    StorageConfig,
    find_credentials,
    is_local,
    local_path,
)

CONFIG_ENV = "ANOMALYDINO_CONFIG"
ENV_FIELDS = {
    "ANOMALYDINO_ROOT": ("root",),
    "ANOMALYDINO_INCOMING": ("incoming",),
    "ANOMALYDINO_REFERENCES": ("references",),
    "ANOMALYDINO_DASK_ADDRESS": ("runtime", "dask_address"),
}
DEFAULT_ROOT = ".data/pipeline"


class _Frozen(BaseModel):
    # inputs are never echoed in errors: a refused value may be a secret
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)


def _refuse_credentials(value: Any, path: str) -> None:
    found = find_credentials(value, path)
    if found:
        raise ValueError(f"{', '.join(found)}: {CREDENTIALS_HINT}")


class StorageSettings(_Frozen):
    """How to reach object storage (no secrets: those come from the environment)."""

    endpoint_url: str | None = Field(
        default=None, description="S3 endpoint, e.g. http://127.0.0.1:8333 (else AWS_ENDPOINT_URL)"
    )
    profile: str | None = Field(default=None, description="AWS shared-credentials profile")
    anon: bool = Field(default=False, description="anonymous access (public buckets)")
    client_kwargs: dict[str, Any] = Field(default_factory=dict, description="botocore options")
    link_roots: list[str] = Field(
        default_factory=list,
        description="local folders that symbolic links in a lot or reference set may point into "
        "(a link may always point inside its own folder; one pointing elsewhere is an error row)",
    )

    @field_validator("link_roots")
    @classmethod
    def _local_roots(cls, value: list[str]) -> list[str]:
        for root in value:
            if not is_local(root):
                raise ValueError(f"link root {root!r}: not a local path")
        return [str(local_path(root)) for root in value]

    @model_validator(mode="after")
    def _no_credentials(self) -> StorageSettings:
        _refuse_credentials(self.model_dump(mode="json"), "storage")
        return self

    def storage_config(self) -> StorageConfig:
        """A ``StorageConfig`` from these settings plus the AWS variables of this process."""
        overrides: dict[str, Any] = {"anon": self.anon, "client_kwargs": dict(self.client_kwargs)}
        if self.endpoint_url:
            overrides["endpoint_url"] = self.endpoint_url
        if self.profile:
            overrides["profile"] = self.profile
        return StorageConfig.from_env(**overrides)


class ProductSettings(_Frozen):
    """Per-product choices; ``None`` inherits the pipeline-wide ``scoring`` setting."""

    scorer: Scorer | None = Field(
        default=None, description="knn, foundad or both (else the pipeline-wide scoring.scorer)"
    )
    masking: MaskingMode | None = None
    rotation: Rotation | None = Field(
        default=None, description="agnostic: 8 rotations of each reference; informed: none"
    )
    mask_references: bool | None = None
    shots: int | None = Field(
        default=None, ge=1, description="use the first N images (by id) of a reference version"
    )
    threshold: float | None = Field(
        default=None, gt=0, description="fixed score threshold (else leave-one-out rule)"
    )
    zero_shot_threshold: float | None = Field(
        default=None, gt=0, description="fixed threshold for screening (else shipment rule)"
    )
    foundad_threshold: float | None = Field(
        default=None, gt=0, description="fixed FoundAD threshold (else held-out normals rule)"
    )


class ThresholdSettings(_Frozen):
    """Rules that derive thresholds when the product config does not fix one (docs/pipeline.md).

    Few-shot: every reference r (at most ``loo_max_references`` of them, evenly spread over the
    sorted ids) is scored against a bank of the other references: s_r. The threshold is
    ``max(max(s), mean(s) + loo_sigmas * std(s)) * (1 + loo_margin)``.
    Zero-shot screening: ``zero_shot_ratio * quantile(q, zero_shot_low_quantile)`` over the
    shipment's scores q: its lowest decile is taken as normal, and an image scoring more than
    twice that level is flagged (works for mostly-normal and mostly-defective shipments alike, as
    long as a tenth of the shipment is normal).
    """

    loo_sigmas: float = Field(
        default=3.0, ge=0, description="few-shot: threshold >= mean + this many std of s"
    )
    loo_margin: float = Field(default=0.0, ge=0, description="few-shot: relative margin on top")
    loo_max_references: int = Field(
        default=16, ge=2, description="few-shot: references scored leave-one-out"
    )
    zero_shot_low_quantile: float = Field(
        default=0.1, ge=0, le=1, description="screening: quantile taken as the normal level"
    )
    zero_shot_ratio: float = Field(
        default=2.0, gt=1, description="screening: flagged above this multiple of that level"
    )


class RuntimeSettings(_Frozen):
    """How the work is split and run; never changes a verdict (scores are bit-identical for the
    same ``chunk_size``: a chunk's bank search is one BLAS product)."""

    chunk_size: int = Field(default=16, ge=1, description="images per task")
    concurrency: int = Field(
        default=1, ge=1, description="tasks at once on the local runner (>1: remote storage)"
    )
    io_threads: int = Field(default=4, ge=1, description="threads reading/decoding/writing")
    dask_address: str | None = Field(default=None, description="tcp://host:port of a scheduler")
    dask_workers: int | None = Field(default=None, ge=1, description="LocalCluster of N workers")
    zero_shot_blocks: int = Field(default=4, ge=1, description="query blocks of a screening")

    @model_validator(mode="after")
    def _one_dask(self) -> RuntimeSettings:
        if self.dask_address and self.dask_workers:
            raise ValueError("dask_address and dask_workers exclude each other: choose one")
        return self


class PipelineConfig(_Frozen):
    """Everything a flow needs besides its job parameters (product, lot, version...)."""

    root: str = Field(
        default=DEFAULT_ROOT, validate_default=True, description="local path or s3:// URI"
    )
    incoming: str | None = Field(default=None, description="default <root>/incoming")
    references: str | None = Field(default=None, description="default <root>/references")
    storage: StorageSettings = Field(default_factory=StorageSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    scoring: ScoringSettings = Field(default_factory=ScoringSettings)
    foundad: FoundADSettings = Field(default_factory=FoundADSettings)
    thresholds: ThresholdSettings = Field(default_factory=ThresholdSettings)
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    products: dict[str, ProductSettings] = Field(default_factory=dict)

    @field_validator("root", "incoming", "references")
    @classmethod
    def _absolute_local(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.strip():
            raise ValueError("empty location")
        return str(local_path(value)) if is_local(value) else value.rstrip("/")

    @field_validator("products")
    @classmethod
    def _product_names(cls, value: dict[str, ProductSettings]) -> dict[str, ProductSettings]:
        for name in value:
            check_name("product", name)
        return value

    @model_validator(mode="after")
    def _no_credentials(self) -> PipelineConfig:
        _refuse_credentials(self.model_dump(mode="json", exclude={"storage"}), "")
        return self

    def layout(self) -> Layout:
        return Layout.at(self.root, self.incoming, self.references)

    def product(self, name: str) -> ProductSettings:
        check_name("product", name)
        return self.products.get(name, ProductSettings())

    def scoring_for(self, product: str) -> ScoringSettings:
        """Pipeline-wide scoring settings with the product's overrides applied."""
        p = self.product(product)
        update = {
            k: v
            for k, v in (
                ("scorer", p.scorer),
                ("masking", p.masking),
                ("rotation", p.rotation),
                ("mask_references", p.mask_references),
            )
            if v is not None
        }
        return self.scoring.model_copy(update=update) if update else self.scoring

    def storage_config(self) -> StorageConfig:
        return self.storage.storage_config()

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | None = None,
        overrides: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> PipelineConfig:
        """Defaults < file (``path`` or ``$ANOMALYDINO_CONFIG``) < environment < ``overrides``.

        ``overrides`` is nested like the file (``{"model": {"resolution": 224}}``).
        """
        env = os.environ if environ is None else environ
        data: dict[str, Any] = {}
        source = path or env.get(CONFIG_ENV)
        if source:
            data = read_config_file(source)
        for var, keys in ENV_FIELDS.items():
            if env.get(var):
                _set(data, keys, env[var])
        if overrides:
            data = merge(data, overrides)
        return cls.model_validate(data)


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A YAML or JSON file as a mapping (errors name the file)."""
    p = Path(path).expanduser()
    try:
        text = p.read_text()
    except OSError as exc:
        raise ValueError(f"config file {p}: cannot read ({exc.strerror or exc})") from None
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ValueError(f"config file {p}: not valid {p.suffix or 'YAML'} ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {p}: expected a mapping at the top level")
    return data


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge of nested mappings; ``update`` wins."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _set(data: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
