"""Few-shot augmentation: probabilities, orientation ops with the foreground, appearance ops."""

from __future__ import annotations

import numpy as np

from anomalydino_core.foundad.augmentation import (
    FewShotAugmentConfig,
    JitterConfig,
    color_jitter,
    few_shot_augment,
)


def _image(shape=(64, 64), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def test_each_stage_fires_with_its_probability():
    image = _image()
    rng = np.random.default_rng(0)
    changed = sum(not np.array_equal(few_shot_augment(image, rng)[0], image) for _ in range(400))
    # orientation or appearance: 1 - 0.7 * 0.7 = 0.51 (a blur of sigma 0.1 may change nothing)
    assert 0.42 < changed / 400 < 0.58
    never = FewShotAugmentConfig(p_orient=0.0, p_appear=0.0)
    assert all(np.array_equal(few_shot_augment(image, rng, never)[0], image) for _ in range(20))


def test_orientation_moves_the_foreground_with_the_image_and_keeps_the_grid_shape():
    orient = FewShotAugmentConfig(p_orient=1.0, p_appear=0.0)
    for shape in ((48, 48), (40, 72)):
        fg = np.zeros(shape, dtype=bool)
        fg[5:15, 3:30] = True
        image = np.repeat((fg * 255).astype(np.uint8)[..., None], 3, axis=2)
        seen = set()
        for seed in range(40):
            out, out_fg = few_shot_augment(image, np.random.default_rng(seed), orient, fg)
            assert out.shape == image.shape  # squares turn in place, others keep their shape
            assert np.array_equal(out[..., 0] > 0, out_fg)
            seen.add(out_fg.tobytes())
        assert len(seen) == (4 if shape[0] == shape[1] else 3)  # h/v flip, 90 and 270 | 180


def test_appearance_ops_jitter_gray_blur():
    appear = FewShotAugmentConfig(p_orient=0.0, p_appear=1.0)
    image = _image((32, 48), seed=1)
    outs = [few_shot_augment(image, np.random.default_rng(s), appear)[0] for s in range(30)]
    assert all(o.shape == image.shape and o.dtype == np.uint8 for o in outs)
    is_gray = [
        bool((o[..., 0] == o[..., 1]).all() and (o[..., 1] == o[..., 2]).all()) for o in outs
    ]
    assert any(is_gray)  # grayscale was drawn
    assert any(not g and not np.array_equal(o, image) for o, g in zip(outs, is_gray, strict=True))


def test_color_jitter_is_seeded_and_bounded():
    image = _image(seed=2)
    config = JitterConfig(0.5, 0.5, 0.5, 0.5)
    a = color_jitter(image, np.random.default_rng(3), config)
    b = color_jitter(image, np.random.default_rng(3), config)
    assert a.tobytes() == b.tobytes() and not np.array_equal(a, image)
    assert np.array_equal(
        color_jitter(image, np.random.default_rng(3), JitterConfig(0, 0, 0, 0)), image
    )
