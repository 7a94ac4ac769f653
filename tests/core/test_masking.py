"""The foreground mask and the masking test: synthetic grids, generated images, MVTec views."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from anomalydino_core.augment import AGNOSTIC_ANGLES, rotate_image
from anomalydino_core.features import PatchFeatureExtractor
from anomalydino_core.masking import (
    MASKING_RULE,
    MaskingDecision,
    decide_masking,
    first_principal_component,
    foreground_mask,
    masking_test,
    view_evidence,
    views_of_references,
)
from tasks.image_files import read_image

from .synthetic import TEXTURES, object_grid, object_on_plain, with_defect

TEXTURE_CATEGORIES = ("carpet", "grid", "leather", "tile", "wood")
MASKED_OBJECTS = ("capsule", "hazelnut", "pill", "screw", "toothbrush")
EITHER_WAY_OBJECTS = ("bottle", "cable", "metal_nut", "transistor", "zipper")


def _views(grids, prefix="view"):
    return [(f"{prefix} {i}", g) for i, g in enumerate(grids)]


def test_foreground_mask_finds_a_centred_object_and_is_deterministic():
    rng = np.random.default_rng(0)
    feats, truth = object_grid(rng)
    mask = foreground_mask(feats, threshold=10.0)
    dilated = ndimage.binary_dilation(truth, structure=np.ones((3, 3)))
    assert np.array_equal(mask, dilated)
    assert np.array_equal(mask, foreground_mask(feats.copy(), threshold=10.0))


@pytest.mark.parametrize(
    ("shape", "spread"),
    [
        ((12, 10, 16), 3.0),  # a clear first component
        ((32, 32, 384), 1.02),  # ViT-S at 448, nearly flat spectrum: Lanczos's slow case
        ((28, 70, 152), 1.0),  # a tall EfficientNet grid, white noise
        ((5, 4, 2), 3.0),  # C = 2: the MRRR path
    ],
)
def test_first_principal_component_matches_svd_with_sklearn_sign(shape, spread):
    rng = np.random.default_rng(3)
    dim = shape[-1]
    feats = rng.normal(0, 1, shape) * np.linspace(spread, 0.5 * spread if spread > 1.5 else 1, dim)
    x = feats.reshape(-1, dim) - feats.reshape(-1, dim).mean(0)
    component = np.linalg.svd(x, full_matrices=False)[2][0]
    component = component if component[np.argmax(np.abs(component))] > 0 else -component
    pc = first_principal_component(feats)
    assert np.allclose(pc, x @ component, atol=1e-8)
    # the sign is fixed by the loadings, not by the input's sign: negated data, negated scores
    assert np.allclose(first_principal_component(-feats), -pc, atol=1e-8)


def test_masking_test_says_on_for_a_varied_object_on_a_plain_background():
    rng = np.random.default_rng(1)
    grids = [object_grid(rng, fg_noise=1.0)[0] for _ in range(4)]
    decision = decide_masking("auto", _views(grids), threshold=10.0)
    assert decision.use_mask and decision.test_passed, decision.explain()
    assert decision.rule == MASKING_RULE and len(decision.views) == 4
    assert all(v.foreground_spread > 2 * v.background_spread for v in decision.views)
    again = MaskingDecision.from_dict(decision.to_dict())
    assert again == decision
    assert "masking on (auto)" in again.explain() and "view 3" in again.explain()


def test_masking_test_says_off_for_textures_close_ups_one_view_and_disagreeing_masks():
    rng = np.random.default_rng(2)
    texture = [rng.normal(0, 1, (24, 24, 32)) for _ in range(3)]
    d = decide_masking("auto", _views(texture), threshold=0.0)
    assert not d.use_mask and "do not show one framed object" in d.reason
    close_up = [object_grid(rng, box=(1, 23, 1, 23), fg_noise=1.0)[0] for _ in range(3)]
    assert not decide_masking("auto", _views(close_up), threshold=10.0).use_mask
    one = [object_grid(rng, fg_noise=1.0)[0]]
    d = decide_masking("auto", _views(one), threshold=10.0)
    assert not d.use_mask and "at least 2 needed" in d.reason
    assert d.views[0].passed  # the view itself is fine: one is not enough
    sizes = [object_grid(rng, box=b, fg_noise=1.0)[0] for b in [(7, 17, 7, 17), (4, 20, 4, 20)]]
    d = decide_masking("auto", _views(sizes), threshold=10.0)
    assert all(v.passed for v in d.views) and not d.use_mask and "disagree" in d.reason
    empty = view_evidence(texture[0], np.zeros((24, 24), bool))
    assert not masking_test([empty, empty])[0]
    forced = decide_masking("off", _views([object_grid(rng, fg_noise=1.0)[0]] * 2), threshold=10.0)
    assert not forced.use_mask and forced.test_passed and "forced off" in forced.reason
    forced = decide_masking("on", _views(texture), threshold=0.0)
    assert forced.use_mask and not forced.test_passed and "the test says off" in forced.reason
    with pytest.raises(ValueError, match="masking must be one of"):
        decide_masking("maybe", _views(texture), threshold=0.0)


def test_tested_views_takes_the_first_references_in_their_rotations():
    grids = [[np.full((2, 2, 1), r * 10 + i) for i in range(8)] for r in range(6)]
    views = views_of_references(grids, AGNOSTIC_ANGLES, [f"ref{r}" for r in range(6)])
    assert len(views) == 4 * 8
    assert views[9][0] == "ref1 rot045" and views[9][1][0, 0, 0] == 11


@pytest.fixture(scope="module")
def extractor(effnet):
    return PatchFeatureExtractor(effnet, resolution=448, precision="fp32", device="cpu")


@pytest.fixture(scope="module", params=["efficientnet_lite0", "dinov2_vits14"])
def real_backbone(request, effnet):
    """Backbones with real weights: DINOv2's cannot be downloaded here, and random weights give
    no meaningful PCA, so it runs only where its official checkpoint is available."""
    if request.param == "efficientnet_lite0":
        return effnet
    from anomalydino_core.backbones import WeightsUnavailableError
    from tasks.weights import load_backbone

    try:
        return load_backbone(request.param)
    except WeightsUnavailableError:
        pytest.skip(f"{request.param}: no real weights here (random weights: no meaningful PCA)")


def _rotations(extractor, image, prefix=""):
    grids = extractor.embed([rotate_image(image, a) for a in AGNOSTIC_ANGLES])
    return [(f"{prefix}rot{a:03d}", g) for a, g in zip(AGNOSTIC_ANGLES, grids, strict=True)]


def test_generated_textures_are_never_masked_and_an_object_is(extractor, effnet):
    threshold = effnet.spec.mask_threshold
    for seed in range(3):
        rng = np.random.default_rng(seed)
        for name, make in TEXTURES.items():
            for defect in (False, True):
                image = make(rng)
                image = with_defect(image, rng) if defect else image
                d = decide_masking("auto", _rotations(extractor, image), threshold=threshold)
                assert not d.use_mask, f"{name} (defect {defect}, seed {seed}): {d.explain()}"
                assert not any(v.passed for v in d.views), d.explain()
        for defect in (False, True):
            image = object_on_plain(rng)
            image = with_defect(image, rng) if defect else image
            d = decide_masking("auto", _rotations(extractor, image), threshold=threshold)
            assert d.use_mask, f"object (defect {defect}, seed {seed}): {d.explain()}"


def _crops(image):
    h, w = image.shape[:2]
    ch, cw = int(h * 0.6), int(w * 0.6)
    top, left = (h - ch) // 2, (w - cw) // 2
    return {
        "centre": image[top : top + ch, left : left + cw],
        "top-left": image[:ch, :cw],
        "top-right": image[:ch, w - cw :],
        "bottom-left": image[h - ch :, :cw],
        "bottom-right": image[h - ch :, w - cw :],
    }


@pytest.mark.slow
def test_mvtec_categories_decide_like_the_authors_in_every_view(categories_root, real_backbone):
    """Each category's good image given in 8 rotations and 5 crops, each tested in its own 8
    rotations (what a 1-shot agnostic bank sees). Textures: off in every view and every view
    fails on its own; the authors' masked objects: on whatever rotation the reference is given
    in; every object: the same decision for all 8 given rotations. Run for each backbone with
    real weights (``real_backbone``)."""
    threshold = real_backbone.spec.mask_threshold
    extractor = PatchFeatureExtractor(real_backbone, resolution=448, device="cpu")
    table = []
    for category in TEXTURE_CATEGORIES + MASKED_OBJECTS + EITHER_WAY_OBJECTS:
        image = read_image(categories_root / category / "good_000.png")
        given = {f"rot{a:03d}": rotate_image(image, a) for a in AGNOSTIC_ANGLES}
        crops = {f"crop {k}": np.ascontiguousarray(v) for k, v in _crops(image).items()}
        decisions = {
            name: decide_masking("auto", _rotations(extractor, view), threshold=threshold)
            for name, view in {**given, **crops}.items()
        }
        rotated = {decisions[name].use_mask for name in given}
        table.append(f"{category}: {decisions['rot000'].reason}")
        if category in TEXTURE_CATEGORIES:
            for name, d in decisions.items():
                assert not d.use_mask, f"{category} {name}: {d.explain()}"
                assert not any(v.passed for v in d.views), f"{category} {name}: {d.explain()}"
        elif category in MASKED_OBJECTS:
            assert rotated == {True}, [decisions[n].explain() for n in given]
        assert len(rotated) == 1, f"{category}: decision flips with the reference's rotation"
    print("\n".join(table))
