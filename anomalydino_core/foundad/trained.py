"""A product's trained projector: training with held-out normal scores, and its bytes.

``train_with_held_out`` trains exactly as :func:`.training.fit` (same pools, same seed, same
weights) and then scores the held-out validation pool: its clean images are augmented normals
the projector never trained on, so their image scores are the product's normal level, and
their CutPaste twins show how far synthetic anomalies land above it. The pipeline derives the
FoundAD threshold from the normal scores (:func:`anomalydino_core.thresholds.held_out_threshold`)
because the kNN's leave-one-out rule would mean one training per reference.

``projector_bytes`` / ``projector_from_bytes``: the weights as safetensors bytes (no pickle, so
loading a stored projector cannot run code), fp32, in ``state_dict`` order; the same weights give
the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .config import FoundADConfig
from .projector import ManifoldProjector, ProjectorConfig
from .scoring import image_scores, patch_errors
from .training import Encode, Progress, TrainingResult, build_pool, train_projector


@dataclass(frozen=True)
class TrainedProjector:
    """The projector, its training record, and the image scores of the held-out pool."""

    training: TrainingResult
    held_out_normal_scores: np.ndarray  # (M,) float64: augmented normals never trained on
    held_out_anomaly_scores: np.ndarray  # (M,) float64: their CutPaste versions

    @property
    def projector(self) -> ManifoldProjector:
        return self.training.projector

    @property
    def embed_dim(self) -> int:
        return int(self.projector.config.embed_dim)


def train_with_held_out(
    images: Sequence[np.ndarray],
    encode: Encode,
    config: FoundADConfig,
    *,
    foregrounds: Sequence[np.ndarray | None] | None = None,
    progress: Progress | None = None,
) -> TrainedProjector:
    """Train on ``images`` (RGB uint8 normals) like ``training.fit``; score the held-out pool."""
    train_cfg = config.training
    train_rng, val_rng = (np.random.default_rng([train_cfg.seed, 2, k]) for k in (0, 1))
    pool = build_pool(images, encode, train_cfg.pool_size, train_rng, train_cfg, foregrounds)
    val_pool = build_pool(images, encode, train_cfg.val_pool_size, val_rng, train_cfg, foregrounds)
    result = train_projector(pool, val_pool, train_cfg, progress)
    del pool
    top_k = config.scoring.top_k
    normal = image_scores(patch_errors(result.projector, val_pool.clean, config.scoring), top_k)
    anomaly = image_scores(patch_errors(result.projector, val_pool.cutpaste, config.scoring), top_k)
    return TrainedProjector(result, normal, anomaly)


def projector_bytes(projector: ManifoldProjector) -> bytes:
    """The projector's weights as safetensors bytes (fp32, contiguous)."""
    state = {
        k: v.detach().to("cpu", torch.float32).contiguous()
        for k, v in projector.state_dict().items()
    }
    return save_safetensors(state)


def projector_from_bytes(data: bytes, config: ProjectorConfig) -> ManifoldProjector:
    """A projector of shape ``config`` with the weights of ``data`` (eval mode, CPU); raises
    ``ValueError`` when the bytes do not hold exactly this shape's weights."""
    try:
        state = load_safetensors(data)
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise ValueError(f"not a safetensors file ({exc})") from None
    projector = ManifoldProjector(config)
    expected = projector.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if state[k].shape != expected[k].shape)
    if missing or extra or wrong:
        raise ValueError(
            "weights do not fit the projector "
            f"(missing {missing[:3]}, unexpected {extra[:3]}, other shape {wrong[:3]})"
        )
    projector.load_state_dict(state)
    return projector.eval()
