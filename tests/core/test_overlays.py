"""The overlay colour scale, the peak location and the overlay image."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from anomalydino_core.overlays import (
    colour_bar,
    colour_levels,
    overlay_scale,
    peak_pixel,
    render_overlay,
)


def test_overlay_scale_puts_the_threshold_mid_scale() -> None:
    assert overlay_scale(0.3, 5.0) == (0.0, 0.6)
    assert overlay_scale(None, 5.0) == (0.0, 5.0)  # no threshold: the lot's max
    assert overlay_scale(None, 0.0) == (0.0, 1.0)  # an all-zero lot still has a valid scale


@pytest.mark.parametrize(
    ("patch", "grid", "size", "expected"),
    [
        ((0, 0), (4, 4), (400, 400), (50, 50)),
        ((3, 1), (4, 2), (400, 100), (350, 75)),
        ((13, 27), (14, 28), (500, 1250), (482, 1227)),
    ],
)
def test_peak_pixel_is_the_patch_centre(patch, grid, size, expected) -> None:
    assert peak_pixel(patch, grid, size) == expected


def test_colour_levels_clip_and_nan() -> None:
    amap = np.array([[-1.0, 0.0, 0.5], [1.0, 2.0, np.nan]], np.float32)
    np.testing.assert_array_equal(colour_levels(amap, 0.0, 1.0), [[0, 0, 128], [255, 255, 0]])
    with pytest.raises(ValueError, match="vmax > vmin"):
        colour_levels(amap, 1.0, 1.0)


def test_colour_levels_equal_the_float32_formula_and_leave_the_map_alone() -> None:
    rng = np.random.default_rng(1)
    for dtype in (np.float32, np.float16, np.float64):
        amap = (rng.standard_normal((90, 120)) * 0.2 + 0.3).astype(dtype)
        amap[5, 5] = np.nan
        before = amap.copy()
        for vmin, vmax in [(0.0, 1.0), (0.13, 0.61), (-0.2, 0.05)]:
            x = np.nan_to_num(amap.astype(np.float32), nan=vmin)
            dense = np.clip(np.rint((x - vmin) / (vmax - vmin) * 255.0), 0, 255).astype(np.uint8)
            np.testing.assert_array_equal(colour_levels(amap, vmin, vmax), dense)
        np.testing.assert_array_equal(amap, before)


def test_colour_bar_matches_the_overlay_colours() -> None:
    bar = colour_bar()
    assert bar.shape == (256, 3) and bar.dtype == np.uint8
    grey = np.full((1, 2, 3), 0, np.uint8)
    over = render_overlay(grey, np.array([[0.0, 1.0]], np.float32), 0.0, 1.0, alpha=1.0)
    np.testing.assert_array_equal(over[0, 0], bar[0])  # vmin: dark blue
    np.testing.assert_array_equal(over[0, 1], bar[-1])  # vmax: dark red
    assert bar[0, 2] > bar[0, 0] and bar[-1, 0] > bar[-1, 2]


def test_render_overlay_is_a_half_blend_with_jet() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    amap = rng.random((6, 5)).astype(np.float32)
    levels = colour_levels(amap, 0.0, 1.0)
    jet = cv2.cvtColor(cv2.applyColorMap(levels, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    expected = 0.5 * image.astype(np.float64) + 0.5 * jet
    got = render_overlay(image, amap, 0.0, 1.0)
    assert np.abs(got.astype(np.float64) - expected).max() <= 1.0
    with pytest.raises(ValueError, match="map shape"):
        render_overlay(image, amap[:3], 0.0, 1.0)
    with pytest.raises(ValueError, match="uint8"):
        render_overlay(image.astype(np.float32), amap, 0.0, 1.0)
