"""A backbone from a state dict handed over in memory: identity, the digest check, random init."""

from __future__ import annotations

import pytest
import torch

from anomalydino_core.backbones import (
    WeightsUnavailableError,
    build_backbone,
    get_backbone_spec,
    verify_digest,
)


def test_state_dict_in_memory_builds_the_same_backbone():
    src = build_backbone("dinov2_vits14", seed=3)
    assert src.identity.weights_sha256 == "random:3" and not src.module.training
    state = {"model": {k: v.clone() for k, v in src.module.vit.state_dict().items()}}
    loaded = build_backbone(
        "dinov2_vits14", state, weights_sha256="ab" * 32, weights_source="in memory"
    )
    assert loaded.identity.to_dict() == {
        "backbone": "dinov2_vits14",
        "weights_sha256": "ab" * 32,
        "weights_source": "in memory",
    }
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), src.module(x), atol=1e-5)
    with pytest.raises(ValueError, match="sha256"):
        build_backbone("dinov2_vits14", state)


def test_digest_check_refuses_a_file_named_like_the_official_one():
    spec = get_backbone_spec("dinov2_vits14")
    assert verify_digest(spec, spec.weights.sha256, "x.pth", pinned=True) == spec.weights.sha256
    assert verify_digest(spec, "0" * 64, "mine.pth", pinned=False) == "0" * 64
    with pytest.raises(WeightsUnavailableError, match=r"x\.pth .* expected b938bf1b"):
        verify_digest(spec, "0" * 64, "x.pth", pinned=True)
