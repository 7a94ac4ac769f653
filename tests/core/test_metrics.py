"""Metrics against slow brute-force references (METHOD.md section 5)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from anomalydino_core.metrics import (
    ImageMetrics,
    PixelMetricAccumulator,
    PixelMetrics,
    image_metrics,
)

# ---------------------------------------------------------------- slow references


def ref_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of (positive, negative) pairs ordered correctly, ties count 0.5."""
    pos, neg = scores[labels], scores[~labels]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (pos.size * neg.size))


def ref_thresholds(scores: np.ndarray) -> list[float]:
    """+inf, then every unique score, descending."""
    return [np.inf, *sorted(set(scores.tolist()), reverse=True)]


def ref_f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    best = 0.0
    for t in ref_thresholds(scores):
        pred = scores >= t
        tp = int(np.sum(pred & labels))
        fp = int(np.sum(pred & ~labels))
        fn = int(np.sum(~pred & labels))
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


def ref_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    """sum_n (R_n - R_{n-1}) P_n over descending unique thresholds."""
    ap, prev_recall = 0.0, 0.0
    n_pos = int(labels.sum())
    for t in ref_thresholds(scores)[1:]:
        pred = scores >= t
        tp = int(np.sum(pred & labels))
        recall = tp / n_pos
        ap += (recall - prev_recall) * tp / int(pred.sum())
        prev_recall = recall
    return ap


def ref_aupro(maps: list[np.ndarray], masks: list[np.ndarray], limit: float = 0.3) -> float:
    """Per-threshold brute-force PRO and FPR, trapezoid up to ``limit``, interpolated there."""
    eight = np.ones((3, 3), dtype=int)
    regions = []  # (image index, region mask)
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=eight)
        regions += [(i, lab == r) for r in range(1, n + 1)]
    negatives = np.concatenate([a[~m] for a, m in zip(maps, masks, strict=True)])
    all_scores = np.concatenate([a.ravel() for a in maps])
    points = []
    for t in ref_thresholds(all_scores):
        overlaps = [float(np.mean(maps[i][r] >= t)) for i, r in regions]
        points.append((float(np.mean(negatives >= t)), sum(overlaps) / len(overlaps)))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:], strict=True):
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            if x0 < limit:
                y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
                area += (limit - x0) * (y0 + y_lim) / 2
            break
    return area / limit


# ---------------------------------------------------------------- image level


@pytest.mark.parametrize("seed", range(6))
def test_image_metrics_match_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(8, 60))
    labels = rng.random(n) < 0.4
    labels[:2] = [True, False]
    # Few distinct values -> many ties, including across classes.
    scores = rng.integers(0, 6, n).astype(np.float64) + labels * rng.integers(0, 3, n)
    if seed % 2:
        scores = scores + rng.normal(0, 0.5, n)  # continuous case, no ties
    m = image_metrics(scores, labels)
    assert isinstance(m, ImageMetrics)
    assert m.auroc == pytest.approx(ref_auroc(scores, labels), abs=1e-12)
    assert m.f1_max == pytest.approx(ref_f1_max(scores, labels), abs=1e-12)
    assert m.ap == pytest.approx(ref_ap(scores, labels), abs=1e-12)


def test_image_metrics_hand_computed() -> None:
    # sklearn documentation example: roc_auc 0.75, average_precision 0.8333.
    m = image_metrics(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    assert (m.auroc, m.ap, m.f1_max) == pytest.approx((0.75, 5 / 6, 0.8))
    # A positive tied with a negative at the top: tie counts as one threshold group.
    m = image_metrics(np.array([0.5, 0.5, 0.2, 0.1]), np.array([1, 0, 1, 0]))
    assert (m.auroc, m.ap, m.f1_max) == pytest.approx((0.625, 0.5 * 0.5 + 0.5 * 2 / 3, 0.8))


def test_image_metrics_extremes() -> None:
    labels = np.array([0, 0, 0, 1, 1], dtype=bool)
    perfect = image_metrics(np.array([0.1, 0.2, 0.3, 0.9, 1.0]), labels)
    assert (perfect.auroc, perfect.ap, perfect.f1_max) == (1.0, 1.0, 1.0)
    inverted = image_metrics(np.array([0.9, 0.8, 0.7, 0.1, 0.0]), labels)
    assert inverted.auroc == 0.0
    all_tied = image_metrics(np.ones(5), labels)
    assert all_tied.auroc == 0.5
    assert all_tied.ap == pytest.approx(0.4)


@pytest.mark.parametrize(
    ("scores", "labels", "match"),
    [
        ([0.1, 0.2, 0.3], [1, 1, 1], "both"),
        ([0.1, 0.2, 0.3], [0, 0, 0], "both"),
        ([0.1, 0.2, 0.3], [0, 1], "mismatch"),
        ([0.1, np.nan, 0.3], [0, 1, 0], "NaN"),
        ([0.1, 0.2, 0.3], [0, 2, 1], "0 and 1"),
    ],
)
def test_image_metrics_errors(scores: list, labels: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        image_metrics(np.array(scores), np.array(labels))


# ---------------------------------------------------------------- pixel level


def synthetic_split(
    seed: int, n_images: int = 6, size: int = 24, step: float = 1 / 32
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Small maps with a few blobs; scores are multiples of ``step`` (bin edges)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    maps, masks = [], []
    for i in range(n_images):
        mask = np.zeros((size, size), dtype=bool)
        if i > 0:  # image 0 is defect-free
            for _ in range(int(rng.integers(1, 4))):
                cy, cx = rng.integers(0, size, 2)
                r = rng.uniform(1.0, 4.0)
                mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        if i == 1:  # two squares touching only diagonally: one region under 8-connectivity
            mask[:] = False
            mask[2:5, 2:5] = True
            mask[5:8, 5:8] = True
        raw = rng.normal(0.6, 0.35, (size, size)) + mask * rng.uniform(0.0, 0.8, (size, size))
        maps.append(np.round(raw / step) * step)  # some fall below 0 or above 2: clipped
        masks.append(mask)
    return maps, masks


def reference_pixel_metrics(
    maps: list[np.ndarray], masks: list[np.ndarray], lo: float, top_edge: float
) -> tuple[float, float, float, float]:
    # The accumulator clips into the range; scores at or above the last edge share its bin.
    clipped = [np.clip(a, lo, top_edge) for a in maps]
    s = np.concatenate([a.ravel() for a in clipped])
    y = np.concatenate([m.ravel() for m in masks])
    return ref_auroc(s, y), ref_f1_max(s, y), ref_aupro(clipped, masks), ref_ap(s, y)


@pytest.mark.parametrize(
    ("seed", "n_bins", "step"), [(0, 64, 1 / 32), (1, 64, 1 / 32), (2, 65536, 1 / 256)]
)
def test_pixel_accumulator_matches_brute_force(seed: int, n_bins: int, step: float) -> None:
    maps, masks = synthetic_split(seed, step=step)
    acc = PixelMetricAccumulator(score_range=(0.0, 2.0), n_bins=n_bins)
    for a, m in zip(maps, masks, strict=True):
        acc.add(a.astype(np.float32), m)
    got = acc.compute()
    assert isinstance(got, PixelMetrics)
    top_edge = 2.0 - 2.0 / n_bins
    auroc, f1_max, aupro, ap = reference_pixel_metrics(maps, masks, 0.0, top_edge)
    assert got.auroc == pytest.approx(auroc, abs=1e-6)
    assert got.f1_max == pytest.approx(f1_max, abs=1e-6)
    assert got.aupro == pytest.approx(aupro, abs=1e-6)
    assert got.ap == pytest.approx(ap, abs=1e-6)
    # Non-trivial data: the metrics are neither perfect nor chance.
    assert 0.6 < got.auroc < 0.99 and 0.1 < got.aupro < 0.99
    assert acc.n_images == 6 and acc.n_pixels == 6 * 24 * 24
    assert acc.n_positive_pixels == sum(int(m.sum()) for m in masks)
    eight = np.ones((3, 3), dtype=int)
    assert acc.n_regions == sum(ndimage.label(m, structure=eight)[1] for m in masks)


def test_pixel_accumulator_uses_8_connectivity() -> None:
    mask = np.zeros((10, 10), dtype=bool)
    mask[1:4, 1:4] = True
    mask[4:6, 4:6] = True  # touches the first square only at a corner
    amap = np.where(mask, 1.0, 0.0)
    acc = PixelMetricAccumulator()
    acc.add(amap, mask)
    assert acc.n_regions == 1


def test_pixel_accumulator_pro_weights_regions_equally() -> None:
    # Big region fully detected, small region missed: pixel TPR is high but PRO is 0.5.
    mask = np.zeros((20, 20), dtype=bool)
    mask[0:8, 0:8] = True  # 64 pixels, score 1.5
    mask[15:17, 15:17] = True  # 4 pixels, score 0.0 like the background
    amap = np.zeros((20, 20))
    amap[0:8, 0:8] = 1.5
    acc = PixelMetricAccumulator(n_bins=8)
    acc.add(amap, mask)
    # Curve: (0, 0) -> (0, 0.5) -> (1, 1); at FPR 0.3 PRO is 0.65, area 0.3 * (0.5 + 0.65) / 2.
    got = acc.compute()
    assert got.aupro == pytest.approx((0.5 + 0.65) / 2)
    assert got.auroc > 0.95  # pixel-wise the small region barely matters


def test_perfect_maps_score_one() -> None:
    rng = np.random.default_rng(3)
    maps, masks = synthetic_split(3)
    acc = PixelMetricAccumulator()
    for m in masks:
        amap = np.where(m, rng.uniform(1.0, 1.9, m.shape), rng.uniform(0.0, 0.9, m.shape))
        acc.add(amap, m)
    got = acc.compute()
    assert got.auroc == pytest.approx(1.0, abs=1e-12)
    assert got.aupro == pytest.approx(1.0, abs=1e-12)
    assert got.f1_max == pytest.approx(1.0, abs=1e-12)
    assert got.ap == pytest.approx(1.0, abs=1e-12)


def test_random_maps_score_chance() -> None:
    rng = np.random.default_rng(4)
    maps, masks = synthetic_split(4, n_images=8, size=64)
    acc = PixelMetricAccumulator()
    for m in masks:
        acc.add(rng.uniform(0.0, 1.0, m.shape), m)
    got = acc.compute()
    assert got.auroc == pytest.approx(0.5, abs=0.03)
    # PRO(fpr) ~ fpr for random scores: area 0.3^2 / 2 over 0.3 = 0.15.
    assert got.aupro == pytest.approx(0.15, abs=0.03)


def test_binning_agrees_with_edges_for_awkward_range() -> None:
    acc = PixelMetricAccumulator(score_range=(0.1, 0.7), n_bins=7)
    edges = 0.1 + 0.6 * (np.arange(8) / 7)
    scores = np.r_[edges, np.nextafter(edges, -np.inf), -1.0, 5.0]
    expected = np.clip(np.searchsorted(edges, np.clip(scores, 0.1, 0.7), side="right") - 1, 0, 6)
    np.testing.assert_array_equal(acc._bin(scores), expected)


def test_pixel_accumulator_errors() -> None:
    acc = PixelMetricAccumulator()
    with pytest.raises(ValueError, match="does not match"):
        acc.add(np.zeros((4, 5)), np.zeros((5, 4), dtype=bool))
    with pytest.raises(ValueError, match="2-D"):
        acc.add(np.zeros((2, 4, 4)), np.zeros((2, 4, 4), dtype=bool))
    with pytest.raises(ValueError, match="NaN"):
        acc.add(np.full((4, 4), np.nan), np.zeros((4, 4), dtype=bool))
    with pytest.raises(ValueError, match="0 and 1"):
        acc.add(np.zeros((4, 4)), np.full((4, 4), 255, dtype=np.uint8))
    with pytest.raises(ValueError, match="both"):
        acc.compute()
    acc.add(np.zeros((4, 4)), np.zeros((4, 4), dtype=bool))
    with pytest.raises(ValueError, match="both"):
        acc.compute()  # negatives only
    assert acc.n_images == 1
    with pytest.raises(ValueError, match="score_range"):
        PixelMetricAccumulator(score_range=(1.0, 1.0))
    with pytest.raises(ValueError, match="n_bins"):
        PixelMetricAccumulator(n_bins=0)
