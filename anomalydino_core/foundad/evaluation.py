"""FoundAD inside the evaluation protocol: train on one run's references, score the test split.

Arrays in, arrays out. The caller (``anomalydino_core.evaluation``) gives the decoded reference
images, their optional foreground masks (objects: CutPaste lands on the object), the test split's
FoundAD tokens (from the same backbone pass as the kNN's features) and a ``measure`` callable
that runs the training and reports its peak memory (the I/O layer samples the process RSS).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..features import PatchFeatureExtractor
from .config import FoundADConfig
from .features import foundad_encoder
from .scoring import anomaly_map, grid_errors, image_scores
from .training import TrainingResult, fit

Log = Callable[[str], None]
#: measure(fn) -> (fn(), peak resident memory in GiB while fn ran; NaN when unknown)
Measure = Callable[[Callable[[], TrainingResult]], tuple[TrainingResult, float]]


def unmeasured(fn: Callable[[], TrainingResult]) -> tuple[TrainingResult, float]:
    return fn(), float("nan")


@dataclass(frozen=True)
class FoundADRun:
    """One trained projector's scores on a test split, and what training cost."""

    scores: np.ndarray  # (N,) float64
    maps: list[np.ndarray]  # N x (H, W) float32 at each image's size
    train_seconds: float  # pool encoding + training
    train_epochs: int
    stopped_by: str
    best_val_loss: float
    peak_rss_gb: float
    score_ms_per_image: float


def train_and_score(
    references: Sequence[np.ndarray],
    foregrounds: Sequence[np.ndarray | None] | None,
    test_tokens: Sequence[np.ndarray],
    image_sizes: Sequence[tuple[int, int]],
    extractor: PatchFeatureExtractor,
    config: FoundADConfig,
    *,
    label: str = "",
    log: Log | None = None,
    measure: Measure = unmeasured,
) -> FoundADRun:
    """Train a projector on ``references`` (RGB uint8) and score ``test_tokens``."""
    log = log or (lambda message: None)

    def progress(epoch: int, train: float, val: float, eta: float) -> None:
        log(
            f"{label}FoundAD epoch {epoch}/{config.training.max_epochs}: train loss {train:.4f}, "
            f"held-out loss {val:.4f}, ETA {eta:.0f}s"
        )

    t0 = time.perf_counter()
    result, peak = measure(
        lambda: fit(
            list(references),
            foundad_encoder(extractor),
            config.training,
            foregrounds=foregrounds,
            progress=progress,
        )
    )
    train_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    errors = grid_errors(result.projector, test_tokens, config.scoring)
    scores = np.concatenate([image_scores(e[None], config.scoring.top_k) for e in errors])
    maps = [
        anomaly_map(e, size, sigma=config.scoring.map_sigma)
        for e, size in zip(errors, image_sizes, strict=True)
    ]
    score_ms = 1000.0 * (time.perf_counter() - t1) / max(1, len(errors))
    return FoundADRun(
        scores=scores,
        maps=maps,
        train_seconds=train_seconds,
        train_epochs=len(result.history),
        stopped_by=result.stopped_by,
        best_val_loss=min((h.val_loss for h in result.history), default=float("nan")),
        peak_rss_gb=peak,
        score_ms_per_image=score_ms,
    )
