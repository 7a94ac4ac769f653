"""Generated test data: feature grids and images (textures, an object on a plain background).

Nothing here comes from a dataset; every array is made from a seed.
"""

from __future__ import annotations

import cv2
import numpy as np

_PROTO = np.random.default_rng(42).normal(0, 0.3, (2, 32))


def object_grid(rng, h=24, w=24, dim=32, box=(6, 18, 5, 19), fg_noise=0.05):
    """(h, w, dim) features: a tight background cluster and an object (``box``) far from it,
    ``fg_noise`` its per-patch variation; returns (features, true object mask)."""
    bg = _PROTO[0]
    fg = _PROTO[1] + 25.0 * np.eye(dim)[0]
    feats = np.tile(bg, (h, w, 1)) + rng.normal(0, 0.05, (h, w, dim))
    top, bottom, left, right = box
    feats[top:bottom, left:right] = fg + rng.normal(0, fg_noise, (bottom - top, right - left, dim))
    truth = np.zeros((h, w), bool)
    truth[top:bottom, left:right] = True
    return feats, truth


def _grey(values: np.ndarray) -> np.ndarray:
    g = np.clip(values, 0, 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=2)


def noise_texture(rng, size=448) -> np.ndarray:
    """Smooth random noise, like a matte cast surface."""
    n = rng.normal(128, 40, (size // 4, size // 4))
    return _grey(cv2.resize(n, (size, size), interpolation=cv2.INTER_CUBIC))


def grating(rng, size=448) -> np.ndarray:
    """A sinusoidal grating at a random angle and frequency (brushed or machined metal)."""
    y, x = np.mgrid[0:size, 0:size]
    theta, freq = rng.uniform(0, np.pi), rng.uniform(0.04, 0.12)
    return _grey(128 + 90 * np.sin(freq * (x * np.cos(theta) + y * np.sin(theta))))


def wood(rng, size=448) -> np.ndarray:
    """Warped brown stripes with grain noise."""
    y, x = np.mgrid[0:size, 0:size].astype(float)
    warp = cv2.resize(rng.normal(0, 1, (8, 8)), (size, size), interpolation=cv2.INTER_CUBIC)
    rings = np.sin(0.08 * x + 6 * warp) + 0.3 * rng.normal(0, 1, (size, size))
    rgb = np.stack([140 + 40 * rings, 100 + 30 * rings, 60 + 20 * rings], axis=-1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def tiles(rng, size=448) -> np.ndarray:
    """One random tile repeated on a grid with dark joints."""
    cell = int(rng.integers(24, 64))
    tile = cv2.GaussianBlur(rng.integers(60, 200, (cell, cell)).astype(float), (0, 0), 2)
    reps = size // cell + 1
    img = np.tile(tile, (reps, reps))[:size, :size]
    img[::cell, :] = 40
    img[:, ::cell] = 40
    return _grey(img)


TEXTURES = {"noise": noise_texture, "grating": grating, "wood": wood, "tiles": tiles}


def with_defect(img: np.ndarray, rng) -> np.ndarray:
    """A dark scratch and a bright spot somewhere in the central half."""
    out = img.copy()
    h, w = out.shape[:2]
    cy, cx = int(rng.integers(h // 4, 3 * h // 4)), int(rng.integers(w // 4, 3 * w // 4))
    cv2.line(out, (cx - 40, cy), (cx + 40, cy + 25), (20, 20, 20), 6)
    cv2.circle(out, (cx, cy - 30), 12, (230, 230, 230), -1)
    return out


def object_on_plain(rng, size=448, background=200) -> np.ndarray:
    """A patterned ellipse (random orientation) on a plain, slightly noisy background."""
    img = np.full((size, size, 3), background, np.uint8)
    img = (img + rng.normal(0, 3, img.shape)).clip(0, 255).astype(np.uint8)
    body = np.zeros((size, size), np.uint8)
    angle = int(rng.integers(0, 180))
    cv2.ellipse(body, (size // 2, size // 2), (size // 4, size // 6), angle, 0, 360, 255, -1)
    small = rng.integers(0, 255, (12, 12)).astype(np.uint8)
    pattern = cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC).astype(np.uint16)
    colour = np.stack([pattern // 2 + 40, pattern // 3 + 20, 60 + pattern // 4], axis=-1)
    img[body > 0] = colour.astype(np.uint8)[body > 0]
    return img
