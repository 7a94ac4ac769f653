"""Local image and mask files read into arrays (decoding is ``anomalydino_core.images``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from anomalydino_core.images import DECODE_MAX_PIXELS, ImageDecodeError, decode_image


def read_image(path: str | Path, *, max_pixels: int | None = DECODE_MAX_PIXELS) -> np.ndarray:
    """Read a local image file as RGB uint8."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageDecodeError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    return decode_image(data, str(path), max_pixels=max_pixels)


def read_mask(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a ground-truth mask as bool (H, W); non-zero is defect."""
    with Image.open(path) as img:
        mask = np.asarray(img.convert("L")) > 0
    if size is not None and mask.shape != tuple(size):
        raise ValueError(f"mask {path} has size {mask.shape}, image has {tuple(size)}")
    return mask
