"""The bf16 CPU path of the DINOv2 blocks against fp32 and against timm's own blocks."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from anomalydino_core.backbones import build_backbone, vit_cpu
from anomalydino_core.features import PatchFeatureExtractor


def _sharpened_vits14():
    """Random ViT-S/14 whose attention is as peaked as a trained one (logits up to ~14)."""
    torch.manual_seed(0)
    backbone = build_backbone("dinov2_vits14")
    with torch.no_grad():
        for block in backbone.module.vit.blocks:
            block.attn.qkv.weight[:768].mul_(4.0)  # q and k rows
            block.ls1.gamma.uniform_(0.5, 1.5)
            block.ls2.gamma.uniform_(0.5, 1.5)
    return backbone


def _features(backbone, precision, x, *, fast=True):
    module = backbone.module
    saved = module._bf16_blocks
    if not fast:
        module._bf16_blocks = None
    try:
        ex = PatchFeatureExtractor(backbone, resolution=448, precision=precision, device="cpu")
        return torch.from_numpy(ex._run(x)).flatten(0, 2)
    finally:
        module._bf16_blocks = saved


def _rel_err(a, ref):
    return float((a - ref).norm() / ref.norm())


def test_bf16_cpu_blocks_match_fp32_as_closely_as_timm_autocast():
    backbone = _sharpened_vits14()
    assert backbone.module._bf16_blocks is not None
    x = torch.randn(2, 3, 448, 448)
    ref = _features(backbone, "fp32", x)
    fast = _features(backbone, "bf16", x)
    timm_bf16 = _features(backbone, "bf16", x, fast=False)
    assert not torch.equal(fast, timm_bf16)  # the two paths really differ
    cos = torch.nn.functional.cosine_similarity(fast, ref, dim=1)
    assert float(cos.min()) >= 0.9995
    assert _rel_err(fast, ref) <= 1.25 * _rel_err(timm_bf16, ref) + 1e-3


def test_bf16_cpu_blocks_follow_new_weights():
    backbone = _sharpened_vits14()
    x = torch.randn(1, 3, 224, 224)
    ex = PatchFeatureExtractor(backbone, resolution=224, precision="bf16", device="cpu")
    before = ex._run(x)
    with torch.no_grad():
        for block in backbone.module.vit.blocks:
            block.mlp.fc2.weight.mul_(-1.0)
    after = ex._run(x)
    ref = PatchFeatureExtractor(backbone, resolution=224, precision="fp32", device="cpu")._run(x)
    assert not np.allclose(before, after)
    cos = torch.nn.functional.cosine_similarity(
        torch.from_numpy(after).flatten(0, 2), torch.from_numpy(ref).flatten(0, 2), dim=1
    )
    assert float(cos.min()) >= 0.9995


def test_unsupported_blocks_keep_timm_path():
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, qk_norm=True, num_classes=0)
    assert not vit_cpu.supports(vit)
    with pytest.raises(ValueError, match="not supported"):
        vit_cpu.Bf16CpuBlocks(vit)
