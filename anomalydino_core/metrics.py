"""Image- and pixel-level anomaly-detection metrics (METHOD.md section 5, MVTec protocol).

Image level is exact (all scores in memory). Pixel level streams over the test split with
fixed-size histograms, so memory is O(n_bins) whatever the number of images.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

#: AU-PRO is integrated over FPR in [0, PRO_FPR_LIMIT] and divided by PRO_FPR_LIMIT.
PRO_FPR_LIMIT = 0.3


@dataclass(frozen=True)
class ImageMetrics:
    """Image-level metrics, each in [0, 1]."""

    auroc: float
    ap: float
    f1_max: float


@dataclass(frozen=True)
class PixelMetrics:
    """Pixel-level metrics over a whole test split, each in [0, 1]."""

    auroc: float
    f1_max: float
    aupro: float
    ap: float


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) * 0.5))


def _curve_metrics(tps: np.ndarray, fps: np.ndarray) -> tuple[float, float, float]:
    """(AUROC, AP, F1-max) from cumulative counts at descending thresholds.

    ``tps[k]`` / ``fps[k]`` count positives / negatives predicted positive at the k-th
    threshold; index 0 is a threshold above every score (0, 0), the last one is below every
    score (all positives, all negatives).
    """
    tps = tps.astype(np.float64)
    fps = fps.astype(np.float64)
    n_pos, n_neg = tps[-1], fps[-1]
    tpr, fpr = tps / n_pos, fps / n_neg
    auroc = _trapezoid(fpr, tpr)
    predicted = tps + fps
    precision = np.divide(tps, predicted, out=np.zeros_like(tps), where=predicted > 0)
    # sklearn's step-wise AP: sum_n (R_n - R_{n-1}) P_n; recall only moves where tps > 0.
    ap = float(np.sum(np.diff(tpr) * precision[1:]))
    f1_max = float(np.max(2.0 * tps / (predicted + n_pos)))
    return auroc, ap, f1_max


def _auc_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under (x, y) for x in [0, x_max], divided by x_max.

    ``x`` must be nondecreasing and start at 0; the curve is interpolated linearly at x_max.
    """
    j = int(np.searchsorted(x, x_max, side="right"))  # first point with x > x_max
    xs, ys = x[:j], y[:j]
    if j < x.size:
        x0, x1, y0, y1 = x[j - 1], x[j], y[j - 1], y[j]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        xs = np.append(xs, x_max)
        ys = np.append(ys, y_at)
    return _trapezoid(xs, ys) / x_max


def _binary(labels: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.dtype == np.bool_:
        return arr
    if not np.all((arr == 0) | (arr == 1)):
        raise ValueError(f"{what} must be boolean or contain only 0 and 1")
    return arr.astype(bool)


def image_metrics(scores: np.ndarray, labels: np.ndarray) -> ImageMetrics:
    """Exact image-level AUROC, AP and F1-max; higher score = more anomalous.

    ``labels`` is boolean (or 0/1), True = anomalous. Equal scores form one threshold group
    (a tie between a positive and a negative counts 0.5 in the AUROC).
    """
    s = np.asarray(scores, dtype=np.float64)
    y = _binary(labels, "labels")
    if s.ndim != 1 or y.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D, got shapes {s.shape} and {y.shape}")
    if s.shape != y.shape:
        raise ValueError(f"length mismatch: {s.size} scores vs {y.size} labels")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise ValueError("image metrics need both normal and anomalous images")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    group_ends = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]
    tps = np.cumsum(y, dtype=np.int64)[group_ends]
    fps = group_ends + 1 - tps
    auroc, ap, f1_max = _curve_metrics(np.r_[0, tps], np.r_[0, fps])
    return ImageMetrics(auroc=auroc, ap=ap, f1_max=f1_max)


class PixelMetricAccumulator:
    """Streaming pixel AUROC / F1-max / AU-PRO / AP over a test split.

    Scores are clipped into ``score_range`` and binned into ``n_bins`` equal bins; the
    thresholds are the bin edges ``lo + k * (hi - lo) / n_bins`` (k < n_bins) plus +inf, and a
    pixel is predicted anomalous when its score >= threshold, so the curves are exact for
    scores lying on bin edges inside the range.
    Per-region overlaps (PRO) are accumulated as a histogram in which every defect pixel
    weighs 1 / (size of its 8-connected ground-truth region): the suffix sum at a threshold is
    the sum of the region overlaps there. Memory is O(n_bins).
    """

    def __init__(self, score_range: tuple[float, float] = (0.0, 2.0), n_bins: int = 65536):
        lo, hi = float(score_range[0]), float(score_range[1])
        if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
            raise ValueError(f"score_range must be finite with lo < hi, got {score_range}")
        if int(n_bins) != n_bins or n_bins < 1:
            raise ValueError(f"n_bins must be a positive integer, got {n_bins}")
        self.score_range = (lo, hi)
        self.n_bins = int(n_bins)
        self._edges = lo + (hi - lo) * (np.arange(self.n_bins + 1, dtype=np.float64) / n_bins)
        self._scale = self.n_bins / (hi - lo)
        self._hist_pos = np.zeros(self.n_bins, dtype=np.int64)
        self._hist_neg = np.zeros(self.n_bins, dtype=np.int64)
        self._region_weight = np.zeros(self.n_bins, dtype=np.float64)
        self._n_regions = 0
        self._n_images = 0

    @property
    def n_images(self) -> int:
        """Number of maps added."""
        return self._n_images

    @property
    def n_pixels(self) -> int:
        """Number of pixels seen (positive + negative)."""
        return int(self._hist_pos.sum() + self._hist_neg.sum())

    @property
    def n_positive_pixels(self) -> int:
        """Number of ground-truth defect pixels seen."""
        return int(self._hist_pos.sum())

    @property
    def n_regions(self) -> int:
        """Number of 8-connected ground-truth defect regions seen."""
        return self._n_regions

    def _bin(self, scores: np.ndarray) -> np.ndarray:
        """Bin index k such that edges[k] <= score < edges[k + 1] (after clipping)."""
        lo, hi = self.score_range
        s = np.clip(scores, lo, hi)
        idx = np.floor((s - lo) * self._scale).astype(np.int64)
        np.clip(idx, 0, self.n_bins - 1, out=idx)
        # Correct floating-point rounding so binning agrees exactly with the edge thresholds.
        idx -= (s < self._edges[idx]) & (idx > 0)
        idx += (s >= self._edges[idx + 1]) & (idx < self.n_bins - 1)
        return idx

    def add(self, anomaly_map: np.ndarray, gt_mask: np.ndarray) -> None:
        """Add one (H, W) anomaly map and its (H, W) boolean ground-truth mask."""
        amap = np.asarray(anomaly_map, dtype=np.float64)
        mask = _binary(gt_mask, "gt_mask")
        if amap.ndim != 2:
            raise ValueError(f"anomaly_map must be 2-D (H, W), got shape {amap.shape}")
        if amap.shape != mask.shape:
            raise ValueError(
                f"anomaly_map shape {amap.shape} does not match gt_mask shape {mask.shape}"
            )
        if not np.isfinite(amap).all():
            raise ValueError("anomaly_map contains NaN or inf")
        idx = self._bin(amap)
        self._hist_neg += np.bincount(idx[~mask], minlength=self.n_bins)
        if mask.any():
            self._hist_pos += np.bincount(idx[mask], minlength=self.n_bins)
            mask_u8 = np.ascontiguousarray(mask, dtype=np.uint8)
            n_labels, labels = cv2.connectedComponents(mask_u8, connectivity=8)
            region = labels[mask]
            sizes = np.bincount(region, minlength=n_labels).astype(np.float64)
            self._region_weight += np.bincount(
                idx[mask], weights=1.0 / sizes[region], minlength=self.n_bins
            )
            self._n_regions += n_labels - 1
        self._n_images += 1

    def compute(self) -> PixelMetrics:
        """Metrics over everything added so far."""
        if self._hist_pos.sum() == 0 or self._hist_neg.sum() == 0:
            raise ValueError("pixel metrics need both defect and normal pixels")

        def desc_cumsum(h: np.ndarray) -> np.ndarray:
            # Count with score >= edges[k] for k = n_bins, n_bins - 1, ..., 0.
            return np.r_[0, np.cumsum(h[::-1])]

        tps, fps = desc_cumsum(self._hist_pos), desc_cumsum(self._hist_neg)
        auroc, ap, f1_max = _curve_metrics(tps, fps)
        pro = np.clip(desc_cumsum(self._region_weight) / self._n_regions, 0.0, 1.0)
        fpr = fps / fps[-1]
        aupro = _auc_up_to(fpr, pro, PRO_FPR_LIMIT)
        return PixelMetrics(auroc=auroc, f1_max=f1_max, aupro=aupro, ap=ap)
