"""FoundAD scores: per-patch squared projection error, top-K image score, smoothed maps.

``errors = mean over channels of (tokens - projector(tokens))^2`` per patch; the image score is
the mean of the K largest patch errors (K = 10, the authors'); the map is the error grid
upsampled bilinearly to the image size and smoothed with a Gaussian of sigma 4 px, exactly as the
kNN maps (:func:`anomalydino_core.scoring.anomaly_map`). anomalib 2.7.0 blurs with a 5 x 5
kernel at sigma 4 (nearly a box filter); this keeps the proper 33 x 33 kernel.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from ..features import Precision, resolve_precision, select_device
from ..few_shot import ScoreResult
from ..scoring import MAP_SIGMA
from ..scoring import anomaly_map as _smoothed_map
from . import defaults
from .projector import ManifoldProjector


@dataclass(frozen=True)
class ScoringConfig:
    """``top_k``: patches averaged into the image score (fewer if the grid is smaller);
    ``map_sigma``: Gaussian sigma of the map in image pixels; ``precision``/``device`` of the
    projector pass (``auto``: bf16 where the CPU or GPU runs it natively, as the features);
    ``batch_size``: images per projector call."""

    top_k: int = defaults.TOP_K
    map_sigma: float = MAP_SIGMA
    precision: Precision = "auto"
    device: str = "auto"
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")


def squared_errors(tokens: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
    """(..., D) tokens and projections -> (...) float32 mean squared error over channels."""
    return (tokens.float() - projected.float()).square().mean(dim=-1)


def patch_errors(
    projector: ManifoldProjector, tokens: np.ndarray, config: ScoringConfig | None = None
) -> np.ndarray:
    """Tokens (B, h, w, D) float -> per-patch errors (B, h, w) float32; projector in eval mode."""
    config = config or ScoringConfig()
    tokens = np.asarray(tokens, dtype=np.float32)
    if tokens.ndim != 4:
        raise ValueError(f"tokens must be (B, h, w, D), got shape {tokens.shape}")
    device = select_device(config.device)
    bf16 = resolve_precision(config.precision, device) == "bf16"
    was_training = projector.training
    projector.eval().to(device)  # (a CPU projector moves to a GPU here and stays there)
    out = []
    try:
        with torch.inference_mode():
            for start in range(0, len(tokens), config.batch_size):
                x = torch.from_numpy(tokens[start : start + config.batch_size]).to(device)
                cast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
                with cast:
                    projected = projector(x)
                out.append(squared_errors(x, projected).cpu().numpy())
    finally:
        projector.train(was_training)
    return np.concatenate(out) if out else np.zeros(tokens.shape[:3], np.float32)


def image_score(errors: np.ndarray, top_k: int = defaults.TOP_K) -> float:
    """Mean of the ``top_k`` largest patch errors of one (h, w) grid (all of them if fewer)."""
    e = np.asarray(errors, dtype=np.float64).ravel()
    if e.size == 0:
        raise ValueError("no patch errors to score")
    k = min(top_k, e.size)
    return float(np.partition(e, e.size - k)[e.size - k :].mean())


def image_scores(errors: np.ndarray, top_k: int = defaults.TOP_K) -> np.ndarray:
    """(B, h, w) patch errors -> (B,) float64 image scores."""
    return np.array([image_score(e, top_k) for e in errors], dtype=np.float64)


def anomaly_map(
    errors: np.ndarray, image_size: tuple[int, int], *, sigma: float = MAP_SIGMA
) -> np.ndarray:
    """(h, w) patch errors -> (H, W) float32 map: bilinear to ``image_size``, then Gaussian."""
    return _smoothed_map(errors, image_size, sigma=sigma)


def grid_errors(
    projector: ManifoldProjector, tokens: Sequence[np.ndarray], config: ScoringConfig
) -> list[np.ndarray]:
    """Per-patch errors (h, w) of token grids (h, w, D) of any mix of sizes, in order (one
    projector call per shape and batch)."""
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, t in enumerate(tokens):
        by_shape[t.shape].append(i)
    out: list[np.ndarray | None] = [None] * len(tokens)
    for indices in by_shape.values():
        errors = patch_errors(projector, np.stack([tokens[i] for i in indices]), config)
        for i, e in zip(indices, errors, strict=True):
            out[i] = e
    return out  # type: ignore[return-value]


def score_result(
    errors: np.ndarray, image_size: tuple[int, int], config: ScoringConfig, *, with_map: bool = True
) -> ScoreResult:
    """One image's FoundAD outcome in the kNN's result type: top-K score, the error grid as
    the patch distances, the smoothed map, the peak patch; no foreground (FoundAD never masks)."""
    errors = np.asarray(errors, dtype=np.float32)
    peak = np.unravel_index(int(np.argmax(errors)), errors.shape)
    return ScoreResult(
        score=image_score(errors, config.top_k),
        patch_distances=errors,
        anomaly_map=anomaly_map(errors, image_size, sigma=config.map_sigma) if with_map else None,
        foreground=None,
        max_patch=(int(peak[0]), int(peak[1])),
    )
