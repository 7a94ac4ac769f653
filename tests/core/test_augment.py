"""Reference rotations, and which of them may go into a bank."""

from __future__ import annotations

import numpy as np

from anomalydino_core.augment import (
    AGNOSTIC_ANGLES,
    MAX_ROTATION_ASPECT,
    bank_angles,
    reference_views,
    rotate_image,
)


def test_rotations_same_size_about_centre():
    img = np.zeros((41, 61, 3), np.uint8)
    img[18:23, 28:33] = 255  # centre square stays put
    assert len(reference_views(img, True)) == len(AGNOSTIC_ANGLES) == 8
    assert reference_views(img, False)[0] is img
    rot = rotate_image(img, 90)
    assert rot.shape == img.shape
    assert rot[20, 30].tolist() == [255, 255, 255]
    corner = np.zeros((40, 40, 3), np.uint8)
    corner[:, :5] = 200  # reflect-101 borders: no black wedges after 45 degrees
    assert rotate_image(corner + 50, 45).min() >= 50


def test_half_turn_is_exact_for_any_shape_and_quarter_turns_for_squares():
    img = np.random.default_rng(0).integers(0, 255, (50, 125, 3), dtype=np.uint8)
    assert np.array_equal(rotate_image(img, 180), img[::-1, ::-1])
    square = img[:, :50]
    assert np.array_equal(rotate_image(square, 90), np.rot90(square, 1))


def test_bank_angles_keep_every_rotation_of_square_images_only():
    assert bank_angles((900, 900), AGNOSTIC_ANGLES) == (AGNOSTIC_ANGLES, None)
    near = (1000, int(1000 * MAX_ROTATION_ASPECT))
    assert bank_angles(near, AGNOSTIC_ANGLES)[0] == AGNOSTIC_ANGLES
    kept, why = bank_angles((1250, 500), AGNOSTIC_ANGLES)
    assert kept == (0, 180)
    assert "500x1250 (aspect 2.50" in why and "60%" in why
    assert bank_angles((1250, 500), (0,)) == ((0,), None)  # informed: nothing left out
