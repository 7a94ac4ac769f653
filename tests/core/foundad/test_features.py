"""One backbone pass, two outputs: the kNN features unchanged (bit for bit) and the FoundAD tokens
from the layer the method reads (DINOv2: third-to-last block + final norm; EfficientNet: blocks[4])."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomalydino_core.backbones import build_backbone
from anomalydino_core.features import PatchFeatureExtractor
from anomalydino_core.foundad.features import embed_with_foundad, foundad_dim, foundad_encoder


@pytest.fixture(scope="module")
def vits14():
    """Random ViT-S/14 whose blocks change the tokens as much as trained ones (LayerScale ~1)."""
    backbone = build_backbone("dinov2_vits14", seed=0)
    with torch.no_grad():
        for block in backbone.module.vit.blocks:
            block.ls1.gamma.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
            block.ls2.gamma.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(2))
    return backbone


@pytest.fixture(scope="module")
def effnet_random():
    return build_backbone("efficientnet_lite0", seed=0)


def _images(n: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def test_dinov2_fp32_knn_output_is_forward_and_foundad_is_third_to_last_block_normed(vits14):
    module = vits14.module
    x = _images(2, (56, 70))
    with torch.inference_mode():
        knn, found = module.forward_with_foundad(x)
        ref = module(x)
        depth = len(module.vit.blocks)
        _, (inter,) = module.vit.forward_intermediates(
            x, indices=[depth - 3], norm=True, output_fmt="NLC", intermediates_only=False
        )
    assert torch.equal(knn, ref)
    assert found.shape == (2, 4, 5, 384) and found.dtype == torch.float32
    expected = inter.reshape(2, 4, 5, 384)  # timm strips the prefix tokens of intermediates
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-5)
    assert (found - knn).norm() > 0.1 * knn.norm()  # a different layer than the kNN's
    assert foundad_dim(PatchFeatureExtractor(vits14, resolution=56, precision="fp32")) == 384


def test_dinov2_bf16_cpu_path_keeps_knn_bits_and_tracks_the_fp32_foundad_tokens(vits14):
    module = vits14.module
    assert module.cpu_bf16_blocks
    x = _images(2, (56, 56), seed=1)
    with torch.inference_mode():
        fp32_found = module.forward_with_foundad(x)[1]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            knn, found = module.forward_with_foundad(x)
            ref = module(x)
    assert torch.equal(knn, ref)
    rel = (found.float() - fp32_found).norm() / fp32_found.norm()
    assert rel < 0.03, rel


def test_efficientnet_knn_output_is_forward_and_foundad_is_raw_blocks4(effnet_random):
    module = effnet_random.module
    x = _images(2, (64, 96), seed=2)
    captured = {}
    hook = module.net.blocks[4].register_forward_hook(lambda m, i, o: captured.setdefault("s16", o))
    try:
        with torch.inference_mode():
            knn, found = module.forward_with_foundad(x)
    finally:
        hook.remove()
    with torch.inference_mode():
        ref = module(x)
    assert torch.equal(knn, ref)
    assert found.shape == (2, 4, 6, 112) == (*knn.shape[:3], module.foundad_dim)
    assert torch.equal(found, captured["s16"].permute(0, 2, 3, 1))
    assert found.norm(dim=-1).std() > 0  # raw, not L2-normalised


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_extractor_helpers_return_embed_bits_and_batched_tokens(vits14, precision):
    extractor = PatchFeatureExtractor(vits14, resolution=56, precision=precision, batch_size=2)
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (60, 60, 3), dtype=np.uint8) for _ in range(3)]
    images.append(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8))  # another input size
    knn, found = embed_with_foundad(extractor, images)
    for a, b in zip(knn, extractor.embed(images), strict=True):
        assert np.array_equal(a, b)
    assert [f.shape for f in found] == [(4, 4, 384)] * 3 + [(4, 6, 384)]
    tokens = foundad_encoder(extractor)(np.stack(images[:3]))
    assert tokens.shape == (3, 4, 4, 384) and tokens.dtype == np.float32
    assert np.array_equal(tokens, np.stack(found[:3]))
