"""The verdict rule: one place decides what a score means for an image."""

from __future__ import annotations

VERDICT_ANOMALOUS = "anomalous"
VERDICT_NORMAL = "normal"
VERDICT_ERROR = "error"
VERDICT_NO_THRESHOLD = "no_threshold"
VERDICTS = (VERDICT_ANOMALOUS, VERDICT_NORMAL, VERDICT_ERROR, VERDICT_NO_THRESHOLD)


def verdict_of(score: float | None, threshold: float | None) -> tuple[str, bool | None]:
    """(verdict, is_anomalous): anomalous when ``score > threshold``.

    No score (the image could not be read or embedded) is an ``error``; no threshold (too few
    references or screened images to derive one, see ``thresholds``) is ``no_threshold``, never
    ``normal``: an image is only called normal against a threshold.
    """
    if score is None:
        return VERDICT_ERROR, None
    if threshold is None:
        return VERDICT_NO_THRESHOLD, None
    flagged = bool(score > threshold)
    return (VERDICT_ANOMALOUS if flagged else VERDICT_NORMAL), flagged
