"""A product's trained projector: the same training as ``fit``, held-out scores, and weights
that round-trip through safetensors bytes exactly (and are refused when they do not fit)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from anomalydino_core.foundad.config import FoundADConfig
from anomalydino_core.foundad.projector import ProjectorConfig
from anomalydino_core.foundad.scoring import ScoringConfig, patch_errors
from anomalydino_core.foundad.trained import (
    projector_bytes,
    projector_from_bytes,
    train_with_held_out,
)
from anomalydino_core.foundad.training import fit
from anomalydino_core.thresholds import held_out_threshold
from tests.core.foundad.test_training import TINY, _toy_encode, _toy_images

CONFIG = FoundADConfig(
    training=replace(TINY, precision="fp32", device="cpu"),
    scoring=ScoringConfig(top_k=3, precision="fp32", device="cpu"),
)


@pytest.fixture(scope="module")
def trained():
    return train_with_held_out(_toy_images(), _toy_encode, CONFIG)


def test_trains_exactly_like_fit_and_scores_the_held_out_pool(trained) -> None:
    reference = fit(_toy_images(), _toy_encode, CONFIG.training)
    assert projector_bytes(trained.projector) == projector_bytes(reference.projector)
    assert [h.val_loss for h in trained.training.history] == [h.val_loss for h in reference.history]
    n = CONFIG.training.val_pool_size
    assert trained.held_out_normal_scores.shape == (n,)
    assert trained.held_out_anomaly_scores.shape == (n,)
    assert np.isfinite(trained.held_out_normal_scores).all()
    decision = held_out_threshold(trained.held_out_normal_scores, sigmas=3.0, margin=0.0)
    assert decision.source == "foundad_held_out"
    assert decision.value >= trained.held_out_normal_scores.max()


def test_weights_round_trip_bit_exactly_and_same_seed_same_bytes(trained) -> None:
    data = projector_bytes(trained.projector)
    again = train_with_held_out(_toy_images(), _toy_encode, CONFIG)
    assert projector_bytes(again.projector) == data
    loaded = projector_from_bytes(data, trained.projector.config)
    tokens = _toy_encode(np.stack(_toy_images(3)))
    np.testing.assert_array_equal(
        patch_errors(loaded, tokens, CONFIG.scoring),
        patch_errors(trained.projector, tokens, CONFIG.scoring),
    )
    other = train_with_held_out(_toy_images(), _toy_encode, replace(
        CONFIG, training=replace(CONFIG.training, seed=1)))  # fmt: skip
    assert projector_bytes(other.projector) != data


def test_weights_that_do_not_fit_are_refused(trained) -> None:
    data = projector_bytes(trained.projector)
    wider = replace(trained.projector.config, width=64, num_heads=2)
    with pytest.raises(ValueError, match="do not fit the projector"):
        projector_from_bytes(data, wider)
    with pytest.raises(ValueError, match="not a safetensors file"):
        projector_from_bytes(b"\x00" * 64, trained.projector.config)
    with pytest.raises(ValueError, match="do not fit the projector"):
        projector_from_bytes(projector_bytes(torch.nn.Linear(2, 2)), ProjectorConfig(embed_dim=16))


def test_held_out_threshold_needs_three_scores() -> None:
    assert held_out_threshold([0.1, 0.2], sigmas=3.0, margin=0.0).value is None
    assert held_out_threshold([0.1, 0.2, 0.3], sigmas=0.0, margin=0.1).value == pytest.approx(0.33)
