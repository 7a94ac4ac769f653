"""CutPaste-union synthetic anomalies (Li et al. 2021, as FoundAD trains with them), numpy/OpenCV.

Each call applies one of two cuts, equally likely:

- **patch**: a rectangle of 2-25% of the image area (aspect ratio w/h uniform in [0.3, 1/0.3]),
  cut anywhere, colour-jittered, pasted elsewhere;
- **scar**: a thin rectangle (2-16 x 10-25 px at a 518 px shorter side, scaled with the image),
  colour-jittered, rotated by -45..45 degrees, pasted elsewhere.

Colour jitter uses strength 0.5 for brightness, contrast, saturation and hue (the authors'
default), in pixel space on uint8 images (so none of the normalised-tensor HSV hazards the
anomalib port documents can occur). With a foreground mask (objects) the paste is centred on a
random foreground pixel and only foreground pixels change; without one (textures) it lands
anywhere. Everything is drawn from the caller's ``np.random.Generator``: same seed, same image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from .augmentation import JitterConfig, color_jitter


@dataclass(frozen=True)
class CutPasteConfig:
    """The authors' CutPaste-union parameters (see the module docstring)."""

    area_ratio: tuple[float, float] = (0.02, 0.25)  # patch area / image area
    aspect_ratio: float = 0.3  # patch width / height uniform in [r, 1 / r]
    scar_width: tuple[int, int] = (2, 16)  # pixels at reference_side, inclusive
    scar_height: tuple[int, int] = (10, 25)
    scar_rotation: tuple[float, float] = (-45.0, 45.0)  # degrees
    reference_side: int = 518  # the authors' input size (shorter side)
    jitter: JitterConfig = JitterConfig(brightness=0.5, contrast=0.5, saturation=0.5, hue=0.5)
    p_scar: float = 0.5
    attempts: int = 10  # redraws when a paste would change no pixel (tiny foreground)


@dataclass(frozen=True)
class Synthesized:
    """An image with a synthetic anomaly: RGB uint8 (H, W, 3), changed pixels (H, W) bool, and
    which cut made it ("patch" or "scar")."""

    image: np.ndarray
    mask: np.ndarray
    kind: str


def _fit_mask(foreground: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray | None:
    """A foreground mask of any resolution as (H, W) bool; None when absent or empty."""
    if foreground is None:
        return None
    fg = np.asarray(foreground, dtype=bool)
    if fg.shape != shape:
        fg = cv2.resize(fg.astype(np.uint8), shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
    return fg if fg.any() else None


def _paste_origin(
    rng: np.random.Generator, shape: tuple[int, int], size: tuple[int, int], fg: np.ndarray | None
) -> tuple[int, int]:
    """Top-left (y, x) of a (h, w) box inside the image, centred on a foreground pixel if any."""
    (height, width), (h, w) = shape, size
    if fg is None:
        return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    ys, xs = np.nonzero(fg)
    i = int(rng.integers(ys.size))
    y = min(max(int(ys[i]) - h // 2, 0), height - h)
    x = min(max(int(xs[i]) - w // 2, 0), width - w)
    return y, x


def _patch(
    image: np.ndarray, rng: np.random.Generator, config: CutPasteConfig
) -> tuple[np.ndarray, np.ndarray] | None:
    """A jittered rectangle of the image and its (all-true) shape mask, or None if it won't fit."""
    height, width = image.shape[:2]
    area = rng.uniform(*config.area_ratio) * height * width
    aspect = rng.uniform(config.aspect_ratio, 1.0 / config.aspect_ratio)
    w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
    if not (0 < w < width and 0 < h < height):
        return None
    y, x = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    patch = color_jitter(image[y : y + h, x : x + w], rng, config.jitter)
    return patch, np.ones((h, w), dtype=bool)


def _scar(
    image: np.ndarray, rng: np.random.Generator, config: CutPasteConfig
) -> tuple[np.ndarray, np.ndarray] | None:
    """A jittered, rotated thin rectangle and its shape mask, or None if it won't fit."""
    height, width = image.shape[:2]
    scale = min(height, width) / config.reference_side
    w = max(1, round(int(rng.integers(config.scar_width[0], config.scar_width[1] + 1)) * scale))
    h = max(1, round(int(rng.integers(config.scar_height[0], config.scar_height[1] + 1)) * scale))
    if not (w < width and h < height):
        return None
    y, x = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    patch = color_jitter(image[y : y + h, x : x + w], rng, config.jitter)
    angle = rng.uniform(*config.scar_rotation)
    # rotate about the centre onto a canvas that holds the whole rotated rectangle
    cos, sin = abs(math.cos(math.radians(angle))), abs(math.sin(math.radians(angle)))
    out_w, out_h = math.ceil(w * cos + h * sin), math.ceil(w * sin + h * cos)
    matrix = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), angle, 1.0)
    matrix[:, 2] += ((out_w - w) / 2.0, (out_h - h) / 2.0)
    patch = cv2.warpAffine(patch, matrix, (out_w, out_h), flags=cv2.INTER_LINEAR)
    inside = cv2.warpAffine(np.ones((h, w), np.float32), matrix, (out_w, out_h)) > 0.5
    if not (out_w < width and out_h < height) or not inside.any():
        return None
    return patch, inside


def cutpaste_union(
    image: np.ndarray,
    rng: np.random.Generator,
    config: CutPasteConfig | None = None,
    foreground: np.ndarray | None = None,
) -> Synthesized:
    """One CutPaste-union anomaly on RGB uint8 ``image`` (H, W, 3).

    ``foreground``: optional (h, w) bool mask of the object (any resolution, resized nearest);
    changed pixels then lie on it. Returns the image unchanged with an empty mask only if no
    paste fits in ``config.attempts`` draws.
    """
    config = config or CutPasteConfig()
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    shape = image.shape[:2]
    fg = _fit_mask(foreground, shape)
    for _ in range(config.attempts):
        kind = "scar" if rng.random() < config.p_scar else "patch"
        cut = (_scar if kind == "scar" else _patch)(image, rng, config)
        if cut is None:
            continue
        patch, inside = cut
        y, x = _paste_origin(rng, shape, inside.shape, fg)
        h, w = inside.shape
        where = inside if fg is None else inside & fg[y : y + h, x : x + w]
        if not where.any():
            continue
        out = image.copy()
        region = out[y : y + h, x : x + w]
        region[where] = patch[where]
        mask = np.zeros(shape, dtype=bool)
        mask[y : y + h, x : x + w] = where
        return Synthesized(image=out, mask=mask, kind=kind)
    return Synthesized(image=image.copy(), mask=np.zeros(shape, dtype=bool), kind="none")
