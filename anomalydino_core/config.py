"""The one validated configuration model, shared by the CLI, the flows and the deployments."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


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
