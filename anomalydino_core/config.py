"""The one validated configuration model, shared by the CLI, the flows and the deployments."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .images import DECODE_MAX_PIXELS


class _Frozen(BaseModel):
    # inputs are never echoed in errors: a refused value may hold a secret
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)


class ModelSettings(_Frozen):
    """Which backbone embeds the images, and how."""

    backbone: str = "auto"
    weights: str | None = Field(
        default=None, description="local path or URI of the weights (default: cache, then hub)"
    )
    resolution: int = Field(default=448, gt=0, description="smaller image edge after resizing")
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: str = "auto"
    batch_size: int = Field(default=8, ge=1)
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads")
    decode_max_pixels: int = Field(
        default=DECODE_MAX_PIXELS,
        ge=1,
        description="images whose header claims more pixels are error rows, never decoded "
        "(default 8192 x 8192: sized for 24 GB, see anomalydino_core.images.DECODE_MAX_PIXELS)",
    )

    @field_validator("weights")
    @classmethod
    def _no_credentials(cls, value: str | None) -> str | None:
        if value and "://" in value and "@" in value.split("://", 1)[1].split("/", 1)[0]:
            raise ValueError(
                "a weights URI with user info (user:password@) is not accepted: settings are "
                "stored with every run; give credentials through the environment"
            )
        return value

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        from .backbones import list_backbones

        if value != "auto" and value not in list_backbones():
            raise ValueError(f"unknown backbone {value!r}; choose auto or {list_backbones()}")
        return value


class ScoringSettings(_Frozen):
    """How patches are compared and aggregated (METHOD.md sections 2-4)."""

    masking: Literal["auto", "on", "off"] = "auto"
    rotation: Literal["agnostic", "informed"] = Field(
        default="agnostic",
        description="agnostic: 8 rotations of each reference; informed: references as they are",
    )
    mask_references: bool = False
    image_score: Literal["top1p_mean", "max", "max_map"] = "top1p_mean"
    sigma: float = Field(default=4.0, ge=0)
    index: Literal["exact", "exact_bf16", "hnsw", "ivf"] = "exact"
    zero_shot_statistic: Literal["code_mean", "quantile"] = "code_mean"
    zero_shot_alpha: float = Field(default=0.001, gt=0, lt=1)
    memory_budget_gb: float = Field(default=2.0, gt=0)


Preprocess = Literal["agnostic", "informed", "masking_only", "none"]
