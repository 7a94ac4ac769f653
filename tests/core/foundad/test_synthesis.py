"""CutPaste-union: area and shape ranges, foreground respected, pixels outside untouched, seeded."""

from __future__ import annotations

import numpy as np
import pytest

from anomalydino_core.foundad.synthesis import CutPasteConfig, cutpaste_union


def _image(shape=(120, 160), seed=0) -> np.ndarray:
    """A textured image: every cut of it differs from where it lands."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (*shape, 3), dtype=np.uint8)


def test_patch_covers_2_to_25_percent_of_the_image_and_only_its_pixels_change():
    image = _image()
    config = CutPasteConfig(p_scar=0.0)
    fractions = []
    for seed in range(60):
        out = cutpaste_union(image, np.random.default_rng(seed), config)
        assert out.kind == "patch"
        assert np.array_equal(out.image[~out.mask], image[~out.mask])
        assert (out.image[out.mask] != image[out.mask]).any()
        ys, xs = np.nonzero(out.mask)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        assert box == out.mask.sum()  # one axis-aligned rectangle
        fractions.append(out.mask.mean())
    fractions = np.array(fractions)
    assert fractions.min() >= 0.02 * 0.95 and fractions.max() <= 0.25 * 1.05
    assert fractions.min() < 0.06 and fractions.max() > 0.18  # the whole range is drawn


def test_scar_is_thin_rotated_and_scales_with_the_image():
    config = CutPasteConfig(p_scar=1.0)
    for shape in ((259, 259), (518, 700)):
        image = _image(shape, seed=1)
        scale = min(shape) / 518
        areas, rotated = [], 0
        for seed in range(40):
            out = cutpaste_union(image, np.random.default_rng(seed), config)
            assert out.kind == "scar"
            assert np.array_equal(out.image[~out.mask], image[~out.mask])
            areas.append(out.mask.sum())
            ys, xs = np.nonzero(out.mask)
            bbox = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
            rotated += bbox > 1.2 * out.mask.sum()
        # at most 16 x 25 px at 518 px (plus interpolation fringe), a thin sliver of the image
        assert max(areas) <= 16 * 25 * scale**2 * 1.3 + 4
        assert min(areas) >= 1
        assert rotated > 10


def test_changes_stay_on_the_foreground_and_centre_there():
    image = _image((100, 100), seed=2)
    fg = np.zeros((100, 100), dtype=bool)
    fg[30:70, 40:90] = True
    for seed in range(80):
        out = cutpaste_union(image, np.random.default_rng(seed), foreground=fg)
        assert out.mask.any()
        assert not (out.mask & ~fg).any()
        assert np.array_equal(out.image[~fg], image[~fg])


def test_foreground_of_another_resolution_is_resized_and_empty_means_anywhere():
    image = _image((100, 100), seed=3)
    small = np.zeros((10, 10), dtype=bool)
    small[0:3, 0:3] = True  # the top-left 30 x 30 pixels
    for seed in range(30):
        out = cutpaste_union(image, np.random.default_rng(seed), foreground=small)
        assert out.mask.any() and not out.mask[30:, :].any() and not out.mask[:, 30:].any()
    empty = np.zeros((100, 100), dtype=bool)
    hits = np.zeros((100, 100), dtype=int)
    for seed in range(30):
        hits += cutpaste_union(image, np.random.default_rng(seed), foreground=empty).mask
    assert hits[50:, 50:].any() and hits[:50, :50].any()


def test_same_seed_same_bytes_other_seed_other_image():
    image = _image()
    fg = np.ones(image.shape[:2], dtype=bool)
    a = cutpaste_union(image, np.random.default_rng(7), foreground=fg)
    b = cutpaste_union(image, np.random.default_rng(7), foreground=fg)
    c = cutpaste_union(image, np.random.default_rng(8), foreground=fg)
    assert a.image.tobytes() == b.image.tobytes() and np.array_equal(a.mask, b.mask)
    assert not np.array_equal(a.mask, c.mask)


def test_rejects_non_rgb_uint8():
    with pytest.raises(ValueError):
        cutpaste_union(np.zeros((10, 10, 3), np.float32), np.random.default_rng(0))
