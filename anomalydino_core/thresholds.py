"""Score thresholds derived automatically, each with its source and the reason for it.

Few-shot (leave-one-out): each sampled reference r is scored, exactly as a test image would be,
against a bank of the *other* references: s_r. threshold = max(max(s), mean(s) + sigmas * std(s))
x (1 + margin). It takes at least ``MIN_LOO_REFERENCES`` references: with two, the spread comes
from two numbers and each is scored against a single-image bank, far above what a test image
scores against the full bank, so the threshold would hide real defects. With fewer references no
threshold is derived: the run reports scores with the verdict ``no_threshold`` (never "normal")
until the product config sets one.

FoundAD (held-out normals): the projector's held-out validation pool holds augmented normal
images it never trained on; the same formula over their image scores gives its threshold
(``held_out_threshold``). It needs no second training, and works from one reference (the pool
has ``val_pool_size`` images, 16 by default).

Zero-shot screening: ratio x the low quantile of the shipment's own scores. It takes at least
``MIN_SCREENING_IMAGES`` scored images, so that the low decile is more than the minimum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MIN_LOO_REFERENCES = 3
MIN_SCREENING_IMAGES = 10


@dataclass(frozen=True)
class ThresholdDecision:
    """A threshold (None: none could be had), where it came from, and why."""

    value: float | None
    source: str  # "config" | "reference_loo" | "foundad_held_out" | "shipment_low_decile" | "none"
    reason: str


def loo_sample(n: int, at_most: int) -> list[int]:
    """Indices of the references scored leave-one-out: all, or ``at_most`` evenly spread."""
    if n <= at_most:
        return list(range(n))
    return sorted({int(round(v)) for v in np.linspace(0, n - 1, at_most)})


def loo_threshold(scores: Sequence[float], sigmas: float, margin: float) -> float:
    """max(max(s), mean(s) + sigmas * std(s)) * (1 + margin), std with ddof=1."""
    s = np.asarray(scores, dtype=np.float64)
    if s.size < 2:
        raise ValueError("the leave-one-out threshold needs at least two references")
    return float(max(s.max(), s.mean() + sigmas * s.std(ddof=1)) * (1.0 + margin))


def reference_threshold(
    loo_scores: Sequence[float], *, sigmas: float, margin: float
) -> ThresholdDecision:
    """The leave-one-out threshold of a bank, or none (with the reason) below 3 references."""
    n = len(loo_scores)
    if n < MIN_LOO_REFERENCES:
        return ThresholdDecision(
            None,
            "none",
            f"{n} reference(s) scored leave-one-out, at least {MIN_LOO_REFERENCES} are needed "
            "for a threshold: set the product's threshold in the config (until then images get "
            "the verdict no_threshold)",
        )
    value = loo_threshold(loo_scores, sigmas, margin)
    return ThresholdDecision(
        value,
        "reference_loo",
        f"max(max, mean + {sigmas:g} std) x {1 + margin:g} of {n} leave-one-out reference scores",
    )


def held_out_threshold(
    normal_scores: Sequence[float], *, sigmas: float, margin: float
) -> ThresholdDecision:
    """FoundAD's threshold from the image scores of its held-out augmented normals."""
    n = len(normal_scores)
    if n < MIN_LOO_REFERENCES:
        return ThresholdDecision(
            None,
            "none",
            f"{n} held-out normal image(s), at least {MIN_LOO_REFERENCES} are needed for a "
            "threshold: raise foundad.val_pool_size or set the product's foundad_threshold",
        )
    value = loo_threshold(normal_scores, sigmas, margin)
    return ThresholdDecision(
        value,
        "foundad_held_out",
        f"max(max, mean + {sigmas:g} std) x {1 + margin:g} of the scores of {n} held-out "
        "augmented normal images",
    )


def effective_threshold(
    configured: float | None, derived: float | None, derived_source: str = "reference_loo"
) -> tuple[float | None, str]:
    """(threshold, source): the product config's value wins over the derived one."""
    if configured is not None:
        return float(configured), "config"
    if derived is not None:
        return float(derived), derived_source
    return None, "none"


def shipment_threshold(scores: Sequence[float], low_quantile: float, ratio: float) -> float:
    """``ratio`` x the ``low_quantile`` quantile (linear interpolation) of the scores."""
    return float(ratio * np.quantile(np.asarray(scores, dtype=np.float64), low_quantile))


def screening_threshold(
    configured: float | None, scores: Sequence[float], *, low_quantile: float, ratio: float
) -> ThresholdDecision:
    """A screening's threshold: the configured one, else from the shipment's own scores."""
    if configured is not None:
        return ThresholdDecision(float(configured), "config", "set in the product config")
    if len(scores) < MIN_SCREENING_IMAGES:
        return ThresholdDecision(
            None,
            "none",
            f"{len(scores)} image(s) scored, at least {MIN_SCREENING_IMAGES} are needed for a "
            "threshold from the shipment itself: set the product's zero_shot_threshold",
        )
    return ThresholdDecision(
        shipment_threshold(scores, low_quantile, ratio),
        "shipment_low_decile",
        f"{ratio:g} x the {low_quantile:g} quantile of {len(scores)} shipment scores",
    )
