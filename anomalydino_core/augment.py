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


#: Above this aspect ratio only the 180-degree turn joins the unrotated view in a bank.
MAX_ROTATION_ASPECT = 1.1


def bank_angles(
    image_size: tuple[int, int], angles: tuple[int, ...]
) -> tuple[tuple[int, ...], str | None]:
    """The rotations of a reference that may go into a bank, and why others were left out.

    Rotating within the frame is exact at 180 degrees for any shape, but a 90-degree turn of an
    h x w image keeps only a min(h, w) square of it and fills the rest of the frame with
    reflections (1 - 1/aspect of it: 60% for a 500 x 1250 part), and 45-degree turns more:
    patches of mirrored seams in a bank can match real defects and hide them. So a reference
    with an aspect ratio above ``MAX_ROTATION_ASPECT`` contributes its 0 and 180 degree views.
    """
    height, width = image_size
    aspect = max(height, width) / max(1, min(height, width))
    kept = tuple(a for a in angles if a % 180 == 0)
    if aspect <= MAX_ROTATION_ASPECT or kept == tuple(angles):
        return tuple(angles), None
    return kept, (
        f"{width}x{height} (aspect {aspect:.2f} > {MAX_ROTATION_ASPECT}): only its "
        f"{'/'.join(str(a) for a in kept)} degree views are in the bank; a turn within the "
        f"frame would fill {1 - 1 / aspect:.0%} or more of it with reflections"
    )
