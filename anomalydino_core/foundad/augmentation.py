"""Few-shot augmentation of the normal training images (before CutPaste), numpy/OpenCV.

The FoundAD authors widen a 1-4 image training set with two independent stages (their
``build_train_transform_staged``, also in anomalib 2.7.0):

1. orientation, with probability ``p_orient``: one of horizontal flip, vertical flip, rotation by
   90 or 270 degrees (equally likely);
2. appearance, with probability ``p_appear``: one of colour jitter (brightness, contrast,
   saturation 0.3, hue 0.05), grayscale, Gaussian blur (kernel 23 px for images of 384 px and
   more, else 11; sigma uniform in [0.1, 2]).

Deviation: a quarter turn of a non-square image would transpose its token grid, so such images
turn by 180 degrees instead (every pooled pair keeps one grid shape). All images are RGB uint8
(H, W, 3); a foreground mask (H, W) bool follows the geometric transform.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

#: ITU-R 601 luma weights, as torchvision's ``rgb_to_grayscale``.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class JitterConfig:
    """Colour jitter strengths (torchvision's ``ColorJitter`` meaning): brightness, contrast and
    saturation factors are drawn from [1 - s, 1 + s], the hue shift from [-hue, hue] turns; the
    four adjustments run in a random order."""

    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 0.05


@dataclass(frozen=True)
class FewShotAugmentConfig:
    """The authors' defaults for 1/2/4-shot training (see the module docstring)."""

    p_orient: float = 0.3
    p_appear: float = 0.3
    jitter: JitterConfig = JitterConfig()
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_large: int = 23  # images whose shorter side is >= blur_large_from pixels
    blur_kernel_small: int = 11
    blur_large_from: int = 384


def grayscale(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) float32 in [0, 1] -> (...) luma."""
    return rgb @ _LUMA


def color_jitter(image: np.ndarray, rng: np.random.Generator, config: JitterConfig) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> colour-jittered RGB uint8 (H, W, 3), computed in [0, 1] floats."""
    x = image.astype(np.float32) / 255.0
    for op in rng.permutation(4):
        if op == 0 and config.brightness > 0:
            x = x * rng.uniform(1 - config.brightness, 1 + config.brightness)
        elif op == 1 and config.contrast > 0:
            f = rng.uniform(1 - config.contrast, 1 + config.contrast)
            x = f * x + (1 - f) * float(grayscale(x).mean())
        elif op == 2 and config.saturation > 0:
            f = rng.uniform(1 - config.saturation, 1 + config.saturation)
            x = f * x + (1 - f) * grayscale(x)[..., None]
        elif op == 3 and config.hue > 0:
            shift = rng.uniform(-config.hue, config.hue) * 360.0
            hsv = cv2.cvtColor(np.ascontiguousarray(x), cv2.COLOR_RGB2HSV)  # H in [0, 360)
            hsv[..., 0] = np.mod(hsv[..., 0] + shift, 360.0)
            x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        x = np.clip(x, 0.0, 1.0)
    return np.rint(x * 255.0).astype(np.uint8)


def _orient(
    image: np.ndarray, foreground: np.ndarray | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    op = int(rng.integers(3))
    if op == 0:
        turn = lambda a: a[:, ::-1]  # noqa: E731
    elif op == 1:
        turn = lambda a: a[::-1]  # noqa: E731
    else:
        k = 1 if rng.random() < 0.5 else 3
        if image.shape[0] != image.shape[1]:
            k = 2  # keep the grid shape (module docstring)
        turn = lambda a: np.rot90(a, k)  # noqa: E731
    fg = None if foreground is None else np.ascontiguousarray(turn(foreground))
    return np.ascontiguousarray(turn(image)), fg


def _appear(
    image: np.ndarray, rng: np.random.Generator, config: FewShotAugmentConfig
) -> np.ndarray:
    op = int(rng.integers(3))
    if op == 0:
        return color_jitter(image, rng, config.jitter)
    if op == 1:
        gray = grayscale(image.astype(np.float32))
        return np.repeat(np.rint(gray).clip(0, 255).astype(np.uint8)[..., None], 3, axis=2)
    large = min(image.shape[:2]) >= config.blur_large_from
    ksize = config.blur_kernel_large if large else config.blur_kernel_small
    sigma = rng.uniform(*config.blur_sigma)
    return cv2.GaussianBlur(image, (ksize, ksize), sigmaX=sigma, sigmaY=sigma)


def few_shot_augment(
    image: np.ndarray,
    rng: np.random.Generator,
    config: FewShotAugmentConfig | None = None,
    foreground: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """One random augmentation: (RGB uint8 (H', W', 3), foreground (H', W') bool or None).

    The output has the input's shape unless a square image was turned (then H' = W' anyway).
    """
    config = config or FewShotAugmentConfig()
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    if foreground is not None and foreground.shape != image.shape[:2]:
        raise ValueError(f"foreground {foreground.shape} does not match image {image.shape[:2]}")
    out, fg = image, foreground
    if rng.random() < config.p_orient:
        out, fg = _orient(out, fg, rng)
    if rng.random() < config.p_appear:
        out = _appear(out, rng, config)
    return out, fg
