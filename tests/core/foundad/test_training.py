"""Training from cached pools: determinism, budgets and callbacks on a toy encoder; on real
EfficientNet-Lite0 features of MVTec bottle (1-shot), training lowers the held-out loss and
separates held-out synthetic anomalies, where the untrained projector does not."""

from __future__ import annotations

import io
from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch

from anomalydino_core.features import PatchFeatureExtractor
from anomalydino_core.foundad.features import foundad_encoder
from anomalydino_core.foundad.projector import ManifoldProjector
from anomalydino_core.foundad.scoring import ScoringConfig, image_scores, patch_errors
from anomalydino_core.foundad.synthesis import cutpaste_union
from anomalydino_core.foundad.training import TrainingConfig, build_pool, fit, train_projector
from anomalydino_core.metrics import image_metrics
from tasks.image_files import read_image

TINY = TrainingConfig(
    width=32,
    depth=1,
    num_heads=2,
    pool_size=8,
    val_pool_size=4,
    batch_size=4,
    max_epochs=3,
    max_seconds=None,
    patience=10,
)


def _toy_encode(images: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B, H/8, W/8, 16): 8 x 8 pixel means through a fixed random map."""
    w = np.random.default_rng(99).normal(size=(3, 16)).astype(np.float32)
    b, h, w_, _ = images.shape
    blocks = images.astype(np.float32).reshape(b, h // 8, 8, w_ // 8, 8, 3)
    means = blocks.mean(axis=(2, 4))
    return np.tanh((means / 127.5 - 1.0) @ w).astype(np.float32)


def _toy_images(n=2) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    base = cv2.resize(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), (64, 64))
    return [np.clip(base.astype(int) + rng.integers(-5, 6, base.shape), 0, 255).astype(np.uint8)
            for _ in range(n)]  # fmt: skip


def _state_bytes(projector: ManifoldProjector) -> bytes:
    buf = io.BytesIO()
    torch.save(projector.state_dict(), buf)
    return buf.getvalue()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_same_seed_same_weights_bytes_and_scores_other_seed_differs(precision):
    images = _toy_images()
    config = replace(TINY, precision=precision, device="cpu")
    runs = [fit(images, _toy_encode, config) for _ in range(2)]
    other = fit(images, _toy_encode, replace(config, seed=1))
    assert runs[0].precision == precision
    assert _state_bytes(runs[0].projector) == _state_bytes(runs[1].projector)
    assert _state_bytes(runs[0].projector) != _state_bytes(other.projector)
    tokens = _toy_encode(np.stack(images))
    scoring = ScoringConfig(precision=precision, device="cpu")
    scores = [patch_errors(r.projector, tokens, scoring) for r in (*runs, other)]
    assert scores[0].tobytes() == scores[1].tobytes()
    assert not np.array_equal(scores[0], scores[2])


def test_training_leaves_torchs_global_rng_alone():
    state = torch.random.get_rng_state()
    fit(_toy_images(), _toy_encode, TINY)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_pool_pairs_clean_and_cutpaste_tokens_with_anomaly_coverage():
    rng = np.random.default_rng(0)
    pool = build_pool(_toy_images(), _toy_encode, 6, rng, TINY)
    assert pool.clean.shape == pool.cutpaste.shape == (6, 8, 8, 16) and pool.embed_dim == 16
    assert pool.anomalous.shape == (6, 8, 8)
    assert all(pool.anomalous[i].max() > 0 for i in range(6))
    changed = np.abs(pool.cutpaste - pool.clean).max(axis=-1) > 1e-6
    assert (changed <= (pool.anomalous > 0)).all()  # the toy encoder is local: only those move
    with pytest.raises(ValueError, match="grid"):
        build_pool([_toy_images()[0], np.zeros((72, 64, 3), np.uint8)], _toy_encode, 2, rng, TINY)


def test_progress_eta_and_early_stopping_and_time_budget():
    rng = np.random.default_rng(0)
    pool = build_pool(_toy_images(), _toy_encode, 8, rng, TINY)
    val = build_pool(_toy_images(), _toy_encode, 4, rng, TINY)
    calls = []
    config = replace(TINY, max_epochs=4)
    result = train_projector(pool, val, config, progress=lambda *a: calls.append(a))
    assert [c[0] for c in calls] == [1, 2, 3, 4] and result.stopped_by == "max_epochs"
    assert all(isinstance(v, float) for c in calls for v in c[1:])
    assert calls[-1][3] == 0.0 and calls[0][3] > 0.0
    assert [h.val_loss for h in result.history] == [c[2] for c in calls]
    # nothing to learn (lr 0): no improvement after epoch 1, stop after `patience` more epochs
    frozen = replace(TINY, lr=0.0, max_epochs=20, patience=2)
    result = train_projector(pool, val, frozen)
    assert result.stopped_by == "early_stopping" and len(result.history) == 3
    assert result.best_epoch == 1
    # a budget shorter than one epoch stops after the first
    hurried = replace(TINY, max_epochs=20, max_seconds=1e-6)
    result = train_projector(pool, val, hurried)
    assert result.stopped_by == "max_seconds" and len(result.history) == 1


# --- real features: EfficientNet-Lite0 (its real weights) on MVTec bottle, 224 px -------------

SMALL = TrainingConfig(
    width=128,
    depth=2,
    num_heads=4,
    pool_size=32,
    val_pool_size=8,
    max_epochs=15,  # 60 steps; lr 2e-3 (not the paper's 1e-3) to get there in that many
    lr=2e-3,
    max_seconds=None,
    precision="fp32",
    device="cpu",
)  # trained AUROC 0.94 for seeds 0-2, untrained 0.76 (measured)


@pytest.fixture(scope="module")
def bottle(mvtec_root) -> list[np.ndarray]:
    paths = sorted((mvtec_root / "bottle" / "train" / "good").glob("*.png"))[:9]
    return [cv2.resize(read_image(p), (224, 224), interpolation=cv2.INTER_AREA) for p in paths]


def test_one_shot_training_on_real_features_separates_held_out_synthetic_anomalies(bottle, effnet):
    extractor = PatchFeatureExtractor(effnet, resolution=224, precision="fp32", device="cpu")
    encode = foundad_encoder(extractor)
    train, held_out = bottle[:1], bottle[1:]
    rng = np.random.default_rng(1234)  # not the training pools' streams
    anomalies = [cutpaste_union(im, rng).image for im in held_out for _ in range(2)]
    tokens = encode(np.stack(held_out + anomalies))
    assert tokens.shape == (24, 14, 14, 112)
    labels = np.r_[np.zeros(len(held_out)), np.ones(len(anomalies))]

    result = fit(train, encode, SMALL)
    losses = [h.val_loss for h in result.history]
    assert min(losses) < 0.6 * losses[0]  # the held-out (validation pool) loss goes down

    scoring = ScoringConfig(precision="fp32", device="cpu")
    trained = image_metrics(image_scores(patch_errors(result.projector, tokens, scoring)), labels)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        untrained = ManifoldProjector(result.projector.config)
    baseline = image_metrics(image_scores(patch_errors(untrained, tokens, scoring)), labels)
    assert trained.auroc >= 0.9, (trained.auroc, baseline.auroc)
    assert baseline.auroc < 0.85, baseline.auroc
