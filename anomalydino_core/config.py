"""The model and scoring settings: one validated definition of each setting and its choices.

``flows/config.py`` composes these with storage, threshold and runtime settings into the
pipeline's ``PipelineConfig``; the command-line flags and docs/settings.md are generated from
the same fields (``flows/settings_cli.py``). The choice lists are the core's own types
(``anomalydino_core/choices.py``), so a new choice is added in one place.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .choices import (
    ImageScoreMethod,
    IndexKind,
    MaskingMode,
    Precision,
    Preprocess,
    Rotation,
    Runtime,
    Scorer,
    Statistic,
)
from .foundad import defaults as foundad_defaults
from .images import DECODE_MAX_PIXELS

__all__ = ["FoundADSettings", "ModelSettings", "Preprocess", "Rotation", "ScoringSettings"]


class _Frozen(BaseModel):
    # inputs are never echoed in errors: a refused value may hold a secret
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)


class ModelSettings(_Frozen):
    """Which backbone embeds the images, and how."""

    backbone: str = Field(
        default="auto",
        description="auto (DINOv2 ViT-S/14, else EfficientNet-Lite0 when its weights are "
        "unavailable) or a registered backbone: dinov2_vits14, dinov2_vitb14, "
        "efficientnet_lite0...",
    )
    weights: str | None = Field(
        default=None, description="local path or URI of the weights (none: the cache, then the hub)"
    )
    resolution: int = Field(
        default=448,
        gt=0,
        description="smaller image edge in pixels after resizing (a multiple of the patch size)",
    )
    precision: Precision = Field(
        default="auto",
        description="auto: bf16 for DINOv2 where the CPU has AMX/AVX512-BF16 or on CUDA; fp32 for "
        "EfficientNet-Lite0 (no faster in bf16 on CPU); int8: int8 weights run by OpenVINO on "
        "CPU (needs the int8 extra; for CPUs without bf16, docs/runtimes.md)",
    )
    device: str = Field(default="auto", description="auto (CUDA when present), cpu, cuda:0...")
    runtime: Runtime = Field(
        default="auto",
        description="what runs the backbone: auto (on CPU the fastest of torch, vit_cpu, openvino, "
        "onnx measured once per machine and model, cached; torch on CUDA), or one forced; "
        "exported runtimes are checked against fp32 torch first (docs/runtimes.md)",
    )
    batch_size: int = Field(
        default=8,
        ge=1,
        description="images per forward pass (on CPU at most the backbone's CPU batch: DINOv2 2, "
        "EfficientNet-Lite0 1)",
    )
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads")
    decode_max_pixels: int = Field(
        default=DECODE_MAX_PIXELS,
        ge=1,
        description="an image whose header claims more pixels is an error row, never decoded "
        "(8192 x 8192, sized for 24 GB: a pipeline image peaks at ~31 B/px, a task keeps 4 in "
        "flight and its 16 decoded images: 67 M px x 160 B = 10.7 GB worst case)",
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

    @model_validator(mode="after")
    def _runtime_runs_precision(self) -> ModelSettings:
        from .runtimes.selection import runtime_precision

        runtime_precision(self.runtime, self.precision)  # onnx with bf16: a clear error
        return self

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        from .backbones import list_backbones

        if value != "auto" and value not in list_backbones():
            raise ValueError(f"unknown backbone {value!r}; choose auto or {list_backbones()}")
        return value


class FoundADSettings(_Frozen):
    """FoundAD training and scoring (METHOD.md section 7; anomalydino_core/foundad/training.py
    explains each default: sized so a 1-shot product trains in minutes on a 2-core CPU)."""

    max_epochs: int = Field(
        default=foundad_defaults.MAX_EPOCHS, ge=1, description="FoundAD: most training epochs"
    )
    max_seconds: float | None = Field(
        default=foundad_defaults.MAX_SECONDS,
        gt=0,
        description="FoundAD: training time budget in seconds (none: epochs only, which makes "
        "the projector byte-reproducible on any machine)",
    )
    pool_size: int = Field(
        default=foundad_defaults.POOL_SIZE,
        ge=1,
        description="FoundAD: augmented/CutPaste pairs encoded once for training",
    )
    val_pool_size: int = Field(
        default=foundad_defaults.VAL_POOL_SIZE,
        ge=1,
        description="FoundAD: held-out synthetic pairs for early stopping",
    )
    patience: int = Field(
        default=foundad_defaults.PATIENCE, ge=1, description="FoundAD: epochs without improvement"
    )
    top_k: int = Field(
        default=foundad_defaults.TOP_K, ge=1, description="FoundAD: patches averaged into the score"
    )

    def config(self, model: ModelSettings, scoring: ScoringSettings, seed: int):
        """The core's ``FoundADConfig`` for these settings (precision, device, map sigma from
        the model and scoring settings)."""
        from .foundad.config import FoundADConfig
        from .foundad.scoring import ScoringConfig
        from .foundad.training import TrainingConfig

        # FoundAD's projector and its backbone pass run in torch: int8 weights are OpenVINO's
        torch_precision = "fp32" if model.precision == "int8" else model.precision
        training = TrainingConfig(
            max_epochs=self.max_epochs,
            max_seconds=self.max_seconds,
            pool_size=self.pool_size,
            val_pool_size=self.val_pool_size,
            patience=self.patience,
            precision=torch_precision,
            device=model.device,
            seed=seed,
        )
        score = ScoringConfig(
            top_k=self.top_k,
            map_sigma=scoring.sigma,
            precision=torch_precision,
            device=model.device,
        )
        return FoundADConfig(training=training, scoring=score)


class ScoringSettings(_Frozen):
    """How patches are compared and aggregated (METHOD.md sections 2-4)."""

    scorer: Scorer = Field(
        default="knn",
        description="few-shot scorer of audits and re-evaluations: knn (the memory bank), "
        "foundad (a projector trained on the references, stored beside the bank) or both "
        "(scores side by side; flagged when either flags); screening is always zero-shot kNN",
    )
    masking: MaskingMode = Field(
        default="auto",
        description="auto: the masking test decides per product (the first 4 references in 8 "
        "rotations; on only if every view shows one object on a plain background, so textures "
        "stay unmasked); on / off force it; `anomalydino show-bank` prints the evidence",
    )
    rotation: Rotation = Field(
        default="agnostic",
        description="agnostic: 8 rotations of each reference; informed: references as they are",
    )
    mask_references: bool = Field(
        default=False, description="also drop the references' background patches from the bank"
    )
    image_score: ImageScoreMethod = Field(
        default="top1p_mean",
        description="top1p_mean: mean of the top 1% patch distances (max below 100 patches); "
        "max; max_map (max of the smoothed map)",
    )
    sigma: float = Field(default=4.0, ge=0, description="Gaussian blur of the anomaly map, px")
    index: IndexKind = Field(
        default="exact",
        description="exact cosine search (on CPU faiss or blocked torch fp32, whichever a "
        "per-process probe measures 15% faster; faiss-gpu or torch fp32 on CUDA); exact_bf16: "
        "bf16 screening + fp32 re-rank (distances within 2e-3; on CPU unless fp32 measures "
        "faster); hnsw / ivf: approximate, for banks of millions of patches",
    )
    zero_shot_statistic: Statistic = Field(
        default="code_mean", description="screening: statistic of the mutual distances"
    )
    zero_shot_alpha: float = Field(
        default=0.001, gt=0, lt=1, description="screening: tail fraction of the mutual distances"
    )
    memory_budget_gb: float = Field(
        default=2.0, gt=0, description="screening: memory for the mutual top-k search"
    )
