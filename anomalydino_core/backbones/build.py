"""A ready backbone from a state dict: identity, digest check and construction (no I/O).

Finding, downloading, hashing and reading weights files is the I/O layer's job
(``tasks/weights.py``); it hands this module a state dict and the sha256 of the file it came from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .registry import BackboneSpec, PreprocessConfig, get_backbone_spec

log = logging.getLogger(__name__)

RANDOM_WEIGHTS = "random"


class WeightsUnavailableError(RuntimeError):
    """No source could supply verified weights for a backbone."""


@dataclass(frozen=True)
class BackboneIdentity:
    """What produced a feature: recorded with every embedding and report row."""

    name: str
    weights_sha256: str  # sha256 of the weights file, or "random:<seed>"
    weights_source: str

    def to_dict(self) -> dict:
        return {
            "backbone": self.name,
            "weights_sha256": self.weights_sha256,
            "weights_source": self.weights_source,
        }


@dataclass
class LoadedBackbone:
    """A backbone module in eval mode with its spec and identity."""

    spec: BackboneSpec
    identity: BackboneIdentity
    module: torch.nn.Module

    def preprocess(self, resolution: int) -> PreprocessConfig:
        return self.spec.preprocess(resolution)


def verify_digest(spec: BackboneSpec, digest: str, where: str, *, pinned: bool) -> str:
    """Check the sha256 of weights for ``spec`` (read from ``where``) against the published one.

    ``pinned``: the weights claim to be the official file (its name), so a different digest is
    an error. Returns ``digest``.
    """
    if pinned and spec.weights.sha256 and digest != spec.weights.sha256:
        raise WeightsUnavailableError(
            f"weights file {where} for {spec.name} has sha256 {digest}, "
            f"expected {spec.weights.sha256}: the file is corrupt or not the official checkpoint"
        )
    if pinned and not spec.weights.sha256:
        log.warning("no pinned sha256 for %s; recording %s", spec.name, digest)
    return digest


def unwrap_state_dict(state: dict) -> dict[str, torch.Tensor]:
    """The model's tensors of a checkpoint (training checkpoints nest them under ``model``)."""
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    return state


def build_backbone(
    name: str,
    state_dict: dict[str, torch.Tensor] | None = None,
    *,
    weights_sha256: str | None = None,
    weights_source: str | None = None,
    seed: int = 0,
) -> LoadedBackbone:
    """Build backbone ``name`` with ``state_dict`` (official or timm layout), in eval mode.

    Without a state dict the weights are random (``torch.manual_seed(seed)``, identity
    ``random:<seed>``): for tests and speed measurements. With one, ``weights_sha256`` and
    ``weights_source`` (the file's digest and where it came from) become its identity.
    """
    spec = get_backbone_spec(name)
    if state_dict is None:
        torch.manual_seed(seed)
        module = spec.build()
        identity = BackboneIdentity(name, f"random:{seed}", "random initialisation")
    else:
        if weights_sha256 is None:
            raise ValueError(f"{name}: the sha256 of the weights must be given with them")
        module = spec.build()
        module.load_official_state_dict(unwrap_state_dict(state_dict))
        identity = BackboneIdentity(name, weights_sha256, weights_source or "state dict")
    module.eval().requires_grad_(False)
    return LoadedBackbone(spec=spec, identity=identity, module=module)
