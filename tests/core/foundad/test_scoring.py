"""Patch errors, top-K image score and maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomalydino_core.foundad.projector import ManifoldProjector, ProjectorConfig
from anomalydino_core.foundad.scoring import (
    ScoringConfig,
    anomaly_map,
    image_score,
    image_scores,
    patch_errors,
    squared_errors,
)
from anomalydino_core.scoring import anomaly_map as knn_anomaly_map


def _projector(dim=12):
    torch.manual_seed(0)
    return ManifoldProjector(ProjectorConfig(embed_dim=dim, width=24, depth=1, num_heads=2))


def test_squared_errors_are_the_channel_mean():
    a, b = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(squared_errors(a, b), ((a - b) ** 2).mean(-1))


def test_zero_projection_gives_the_mean_square_of_the_tokens_in_fp32():
    projector = _projector()
    with torch.no_grad():
        projector.head.weight.zero_()
        projector.head.bias.zero_()
    tokens = np.random.default_rng(0).normal(size=(3, 4, 5, 12)).astype(np.float32)
    config = ScoringConfig(precision="fp32", device="cpu", batch_size=2)
    errors = patch_errors(projector, tokens, config)
    assert errors.shape == (3, 4, 5) and errors.dtype == np.float32
    np.testing.assert_allclose(errors, (tokens**2).mean(-1), rtol=1e-6)
    assert projector.training  # the caller's mode is restored


def test_bf16_errors_track_fp32():
    projector = _projector()
    tokens = np.random.default_rng(1).normal(size=(2, 6, 6, 12)).astype(np.float32)
    fp32 = patch_errors(projector, tokens, ScoringConfig(precision="fp32", device="cpu"))
    bf16 = patch_errors(projector, tokens, ScoringConfig(precision="bf16", device="cpu"))
    assert np.abs(bf16 - fp32).max() / fp32.mean() < 0.05


def test_image_score_is_the_top_k_mean():
    errors = np.arange(30, dtype=np.float32).reshape(5, 6)
    assert image_score(errors, 10) == pytest.approx(np.arange(20, 30).mean())
    assert image_score(errors[:1, :3], 10) == pytest.approx(1.0)  # fewer patches than K
    np.testing.assert_allclose(image_scores(np.stack([errors, errors * 2]), 1), [29.0, 58.0])
    with pytest.raises(ValueError):
        ScoringConfig(top_k=0)


def test_map_is_the_knn_maps_upsampling_and_blur():
    errors = np.random.default_rng(2).random((7, 9)).astype(np.float32)
    amap = anomaly_map(errors, (70, 90))
    assert amap.shape == (70, 90) and amap.dtype == np.float32
    np.testing.assert_array_equal(amap, knn_anomaly_map(errors, (70, 90), sigma=4.0))
