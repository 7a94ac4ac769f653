"""The verdict rule."""

from __future__ import annotations

import pytest

from anomalydino_core.verdicts import (
    VERDICT_ANOMALOUS,
    VERDICT_ERROR,
    VERDICT_NO_THRESHOLD,
    VERDICT_NORMAL,
    verdict_of,
)


@pytest.mark.parametrize(
    ("score", "threshold", "expected"),
    [
        (2.0, 1.0, (VERDICT_ANOMALOUS, True)),
        (0.5, 1.0, (VERDICT_NORMAL, False)),
        (1.0, 1.0, (VERDICT_NORMAL, False)),  # strictly above the threshold is anomalous
        (None, 1.0, (VERDICT_ERROR, None)),
        (None, None, (VERDICT_ERROR, None)),
        (5.0, None, (VERDICT_NO_THRESHOLD, None)),  # never "normal" without a threshold
        (0.0, None, (VERDICT_NO_THRESHOLD, None)),
    ],
)
def test_verdict_of(score, threshold, expected) -> None:
    assert verdict_of(score, threshold) == expected
