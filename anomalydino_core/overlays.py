"""How anomaly maps are shown: the lot's one colour scale, the overlay image, the peak location.

Overlays blend the image with the JET colour map of its anomaly map on one scale for the whole
lot, ``[0, 2 * threshold]`` (the threshold sits mid-scale; anything twice as far from the
references as the threshold is full red), or ``[0, max of the lot's maps]`` when there is no
threshold. One scale per lot makes overlays comparable across images of the lot.
"""

from __future__ import annotations

import cv2
import numpy as np

OVERLAY_ALPHA = 0.5
COLOUR_MAP = cv2.COLORMAP_JET


def overlay_scale(threshold: float | None, lot_max: float) -> tuple[float, float]:
    """The one colour scale (vmin, vmax) of a lot's overlays (see the module docstring)."""
    vmax = 2.0 * threshold if threshold else lot_max
    return 0.0, float(vmax) if vmax > 0 else 1.0


def peak_pixel(
    max_patch: tuple[int, int], grid: tuple[int, int], size: tuple[int, int]
) -> tuple[int, int]:
    """Centre (y, x) in original pixels of patch (row, col) of an aligned grid over the image."""
    (row, col), (gh, gw), (h, w) = max_patch, grid, size
    return int((row + 0.5) * h / gh), int((col + 0.5) * w / gw)


def colour_levels(amap: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """(H, W) uint8 colour-map levels of ``amap`` on the scale [vmin, vmax] (NaN -> vmin)."""
    if not vmax > vmin:
        raise ValueError(f"need vmax > vmin, got vmin={vmin}, vmax={vmax}")
    scaled = np.array(amap, dtype=np.float32)  # one copy, then float32 steps in place
    np.nan_to_num(scaled, copy=False, nan=vmin)
    scaled -= vmin
    scaled /= vmax - vmin
    scaled *= 255.0
    np.rint(scaled, out=scaled)
    return np.clip(scaled, 0, 255, out=scaled).astype(np.uint8)


def colour_bar(levels: int = 256) -> np.ndarray:
    """(levels, 3) uint8 RGB colours of the scale from vmin (row 0) to vmax (last row)."""
    ramp = np.linspace(0, 255, levels).round().astype(np.uint8)[:, None]
    return cv2.cvtColor(cv2.applyColorMap(ramp, COLOUR_MAP), cv2.COLOR_BGR2RGB)[:, 0, :]


def render_overlay(
    image_rgb: np.ndarray, amap: np.ndarray, vmin: float, vmax: float, alpha: float = OVERLAY_ALPHA
) -> np.ndarray:
    """(H, W, 3) uint8 RGB blend of ``image_rgb`` and the colour map of ``amap`` in [vmin, vmax]."""
    if image_rgb.dtype != np.uint8 or image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image_rgb.shape} {image_rgb.dtype}")
    if amap.shape != image_rgb.shape[:2]:
        raise ValueError(f"map shape {amap.shape} != image shape {image_rgb.shape[:2]}")
    heat_bgr = cv2.applyColorMap(colour_levels(amap, vmin, vmax), COLOUR_MAP)
    image_bgr = cv2.cvtColor(np.ascontiguousarray(image_rgb), cv2.COLOR_RGB2BGR)
    blended = cv2.addWeighted(image_bgr, 1.0 - alpha, heat_bgr, alpha, 0.0)
    return cv2.cvtColor(blended, cv2.COLOR_BGR2RGB)
