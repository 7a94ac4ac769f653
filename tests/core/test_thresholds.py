"""Automatic thresholds: the leave-one-out rule, the screening rule, and when they abstain."""

from __future__ import annotations

import pytest

from anomalydino_core.thresholds import (
    MIN_LOO_REFERENCES,
    MIN_SCREENING_IMAGES,
    effective_threshold,
    loo_sample,
    loo_threshold,
    reference_threshold,
    screening_threshold,
    shipment_threshold,
)


def test_threshold_rules() -> None:
    assert loo_threshold([0.1, 0.2, 0.3], sigmas=0.0, margin=0.0) == pytest.approx(0.3)
    assert loo_threshold([0.1, 0.2, 0.3], sigmas=3.0, margin=0.0) == pytest.approx(0.5)
    assert loo_threshold([0.1, 0.2], sigmas=0.0, margin=0.1) == pytest.approx(0.22)
    with pytest.raises(ValueError, match="two references"):
        loo_threshold([0.1], 3.0, 0.0)
    assert effective_threshold(0.4, 0.2) == (0.4, "config")
    assert effective_threshold(None, 0.2) == (0.2, "reference_loo")
    assert effective_threshold(None, None) == (None, "none")
    assert loo_sample(5, 16) == [0, 1, 2, 3, 4]
    assert loo_sample(209, 16)[0] == 0 and loo_sample(209, 16)[-1] == 208
    assert len(loo_sample(209, 16)) == 16
    # screening: twice the lowest decile, robust to a mostly-defective shipment
    scores = [0.1] * 3 + [0.4] * 17
    assert shipment_threshold(scores, 0.1, 2.0) == pytest.approx(0.2)


def test_reference_threshold_abstains_below_three_references_and_says_why() -> None:
    for n in range(MIN_LOO_REFERENCES):
        d = reference_threshold([0.2] * n, sigmas=3.0, margin=0.0)
        assert d.value is None and d.source == "none"
        assert f"{n} reference(s)" in d.reason and "set the product's threshold" in d.reason
    d = reference_threshold([0.1, 0.2, 0.3], sigmas=3.0, margin=0.0)
    assert d.value == pytest.approx(0.5) and d.source == "reference_loo"
    assert "3 leave-one-out reference scores" in d.reason


def test_screening_threshold_needs_enough_images_unless_configured() -> None:
    few = [0.1] * (MIN_SCREENING_IMAGES - 1)
    d = screening_threshold(None, few, low_quantile=0.1, ratio=2.0)
    assert d.value is None and d.source == "none" and "zero_shot_threshold" in d.reason
    d = screening_threshold(0.7, few, low_quantile=0.1, ratio=2.0)
    assert (d.value, d.source) == (0.7, "config")
    enough = [0.1] * 3 + [0.4] * (MIN_SCREENING_IMAGES - 3)
    d = screening_threshold(None, enough, low_quantile=0.1, ratio=2.0)
    assert d.value == pytest.approx(shipment_threshold(enough, 0.1, 2.0))
    assert d.source == "shipment_low_decile"
