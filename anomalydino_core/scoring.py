"""Image scores and anomaly maps from patch distances (METHOD.md section 3)."""

from __future__ import annotations

import functools
import typing

import cv2
import numpy as np

from .choices import ImageScoreMethod

IMAGE_SCORE_METHODS: tuple[str, ...] = typing.get_args(ImageScoreMethod)

#: Gaussian sigma (pixels at the original resolution) applied to anomaly maps.
MAP_SIGMA = 4.0


def top1p_mean(patch_distances: np.ndarray) -> float:
    """Mean of the top floor(1%) of the distances; the max when fewer than 100 patches.

    Masked patches are expected to be present with distance 0 (they count in n).
    """
    d = np.asarray(patch_distances, dtype=np.float64).ravel()
    if d.size == 0:
        raise ValueError("no patch distances to score")
    k = d.size // 100
    if k == 0:
        return float(d.max())
    return float(np.partition(d, d.size - k)[d.size - k :].mean())


def anomaly_map(
    distance_grid: np.ndarray, image_size: tuple[int, int], *, sigma: float = MAP_SIGMA
) -> np.ndarray:
    """Bilinear upsampling of a (gh, gw) distance grid to ``image_size`` = (H, W), then Gaussian.

    The grid is treated as covering the whole image (aligned grid: patch centres at
    ((i + 0.5) * H / gh)), which is what OpenCV's INTER_LINEAR does; the Gaussian reflects at
    the border (``BORDER_REFLECT``, 4 sigma each side). Both steps are linear and separable, so
    the map is ``A_y @ grid @ A_x.T`` with one (H, gh) and one (W, gw) matrix per axis
    (``_axis_operator``: OpenCV's own resize and blur applied to unit impulses): two small
    matrix products instead of a 33-tap blur over the full image: 900 x 900 from 32 x 32, one
    thread (Intel Xeon, AMX), 0.49 ms against 5.0 for OpenCV's resize + blur in the same minute,
    values within 6e-7 of theirs (1 float16 step in ~1e-4 of the map's pixels).
    """
    grid = np.asarray(distance_grid, dtype=np.float32)
    if grid.ndim != 2:
        raise ValueError(f"distance grid must be 2-D, got shape {grid.shape}")
    height, width = int(image_size[0]), int(image_size[1])
    rows = _axis_operator(height, grid.shape[0], float(sigma))
    cols = _axis_operator(width, grid.shape[1], float(sigma))
    return rows @ (grid @ cols.T)


@functools.lru_cache(maxsize=64)
def _axis_operator(size: int, cells: int, sigma: float) -> np.ndarray:
    """(size, cells) float32, read-only: INTER_LINEAR resampling of ``cells`` values to
    ``size``, then (``sigma`` > 0) the Gaussian of ``anomaly_map`` along that axis."""
    impulses = np.eye(cells, dtype=np.float32)
    op = cv2.resize(impulses, (cells, size), interpolation=cv2.INTER_LINEAR)
    if sigma > 0:
        ksize = 2 * int(4.0 * sigma + 0.5) + 1
        op = cv2.GaussianBlur(op, (1, ksize), sigmaX=0, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    op = np.ascontiguousarray(op, dtype=np.float32)
    op.flags.writeable = False
    return op


def image_score(
    patch_distances: np.ndarray,
    method: str = "top1p_mean",
    *,
    amap: np.ndarray | None = None,
) -> float:
    """Image-level anomaly score from the patch distances (or the smoothed map for ``max_map``)."""
    if method == "top1p_mean":
        return top1p_mean(patch_distances)
    if method == "max":
        return float(np.max(patch_distances))
    if method == "max_map":
        if amap is None:
            raise ValueError("image score 'max_map' needs the anomaly map")
        return float(np.max(amap))
    raise ValueError(f"unknown image score method {method!r}; choose one of {IMAGE_SCORE_METHODS}")
