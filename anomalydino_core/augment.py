"""Reference augmentation: in-plane rotations for the 'agnostic' preprocessing."""

from __future__ import annotations

import cv2
import numpy as np

#: 0..315 degrees in 45-degree steps (METHOD.md section 3).
AGNOSTIC_ANGLES: tuple[int, ...] = tuple(range(0, 360, 45))


def rotate_image(image: np.ndarray, angle: float) -> np.ndarray:
    """Rotate about the centre, same size, bilinear, reflect-101 borders."""
    if angle % 360 == 0:
        return image
    height, width = image.shape[:2]
    matrix = cv2.getRotationMatrix2D(((width - 1) / 2.0, (height - 1) / 2.0), angle, 1.0)
    return cv2.warpAffine(
        image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
    )


def reference_views(image: np.ndarray, rotate: bool) -> list[np.ndarray]:
    """The image and, with ``rotate``, its 7 further rotations."""
    if not rotate:
        return [image]
    return [rotate_image(image, a) for a in AGNOSTIC_ANGLES]
