"""Image scores, anomaly maps, masking, the memory bank and few-shot scoring."""

from __future__ import annotations

import cv2
import faiss
import numpy as np
import pytest
from scipy import ndimage

from anomalydino_core.few_shot import FewShotScorer
from anomalydino_core.masking import foreground_mask
from anomalydino_core.memory_bank import PatchIndex
from anomalydino_core.scoring import anomaly_map, image_score, top1p_mean

from .synthetic import object_grid


def test_top1p_mean_rules():
    d = np.arange(1000, dtype=float)
    assert top1p_mean(d) == pytest.approx(np.mean(np.arange(990, 1000)))
    d = np.arange(250, dtype=float)  # floor(2.5) = 2
    assert top1p_mean(d) == pytest.approx((249 + 248) / 2)
    assert top1p_mean(np.array([0.1, 0.7, 0.3])) == pytest.approx(0.7)  # n < 100: max
    with pytest.raises(ValueError):
        top1p_mean(np.array([]))


def test_image_score_options():
    d = np.zeros(400)
    d[7] = 1.0
    grid = d.reshape(20, 20)
    amap = anomaly_map(grid, (80, 80))
    assert image_score(d, "max") == 1.0
    assert image_score(d, "top1p_mean") == pytest.approx(0.25)
    assert image_score(d, "max_map", amap=amap) == pytest.approx(float(amap.max()))
    with pytest.raises(ValueError, match="unknown image score"):
        image_score(d, "median")


def test_anomaly_map_matches_scipy_reference():
    rng = np.random.default_rng(0)
    grid = rng.random((8, 10)).astype(np.float32)
    amap = anomaly_map(grid, (56, 70), sigma=4.0)
    assert amap.shape == (56, 70) and amap.dtype == np.float32
    # reference: half-pixel bilinear upsampling, then scipy's Gaussian (reflect, truncate 4)
    ys = (np.arange(56) + 0.5) / 7.0 - 0.5
    xs = (np.arange(70) + 0.5) / 7.0 - 0.5
    yy, xx = np.meshgrid(np.clip(ys, 0, 7), np.clip(xs, 0, 9), indexing="ij")
    up = ndimage.map_coordinates(grid.astype(np.float64), [yy, xx], order=1, mode="nearest")
    ref = ndimage.gaussian_filter(up, sigma=4.0, mode="reflect", truncate=4.0)
    assert np.abs(amap - ref).max() < 1e-4


@pytest.mark.parametrize(
    ("grid_shape", "size", "sigma"),
    [((32, 32), (900, 900), 4.0), ((28, 70), (500, 1250), 4.0), ((32, 32), (900, 900), 0.0),
     ((4, 4), (3, 3), 4.0), ((1, 1), (14, 14), 4.0)],
)  # fmt: skip
def test_anomaly_map_equals_opencv_resize_then_blur(grid_shape, size, sigma):
    """The matrix form is OpenCV's own upsampling and blur over the whole image, to float
    rounding, on square, wide, unblurred, shrunk and one-patch grids."""
    grid = np.random.default_rng(1).random(grid_shape).astype(np.float32)
    ref = cv2.resize(grid, size[::-1], interpolation=cv2.INTER_LINEAR)
    if sigma > 0:
        k = 2 * int(4 * sigma + 0.5) + 1
        ref = cv2.GaussianBlur(
            ref, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT
        )
    amap = anomaly_map(grid, size, sigma=sigma)
    assert amap.shape == size and amap.dtype == np.float32 and amap.flags.writeable
    np.testing.assert_allclose(amap, ref, rtol=0, atol=2e-6)


def test_patch_index_exact_cosine_and_round_trip():
    """Through bytes; the file pair (and a truncated file) is tests/tasks/test_index_files.py."""
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(500, 16)).astype(np.float32)
    queries = rng.normal(size=(40, 16)).astype(np.float32)
    index = PatchIndex().fit(bank * rng.uniform(0.5, 3.0, (500, 1)))  # scale must not matter
    got = index.nearest_distance(queries)
    bn = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    ref = 1.0 - (qn @ bn.T).max(axis=1)
    assert np.allclose(got, ref, atol=1e-5)
    loaded = PatchIndex.from_bytes(index.to_bytes())
    assert loaded.size == 500 and np.array_equal(loaded.nearest_distance(queries), got)


def test_one_search_for_several_images_equals_one_search_each():
    rng = np.random.default_rng(4)
    scorer = FewShotScorer().fit([rng.normal(size=(12, 12, 32)).astype(np.float32)])
    grids = [rng.normal(size=(12, 12, 32)).astype(np.float32) for _ in range(4)]
    masks = [rng.random((12, 12)) > 0.4, None, np.zeros((12, 12), bool), rng.random((12, 12)) > 0.7]
    together = scorer.patch_distances(grids, masks)
    for grid, fg, patch in zip(grids, masks, together, strict=True):
        alone = scorer.score(grid, image_size=(48, 48), foreground=fg)
        # same rows, same distances; BLAS blocking may differ in the last float bit
        assert np.allclose(patch, alone.patch_distances, rtol=0, atol=1e-6)
        assert np.array_equal(patch == 0, alone.patch_distances == 0)
        if fg is not None:
            assert (patch[~fg] == 0).all()
    assert (together[2] == 0).all() and (together[1] > 0).all()


def test_flat_index_pads_odd_dims_and_round_trips_through_bytes():
    rng = np.random.default_rng(1)
    bank = rng.normal(size=(300, 152)).astype(np.float32)
    queries = rng.normal(size=(30, 152)).astype(np.float32)
    index = PatchIndex().fit(bank)
    assert index.dim == 152 and index._index.d == 192  # zero-padded for faiss's BLAS
    bn = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    got = index.search(queries)
    assert np.allclose(got.distances[:, 0], 1.0 - (qn @ bn.T).max(axis=1), atol=1e-5)
    assert np.array_equal(got.indices[:, 0], (qn @ bn.T).argmax(axis=1))
    again = PatchIndex.from_bytes(index.to_bytes(), "exact")
    assert again.dim == 152 and np.array_equal(again.search(queries).indices, got.indices)
    with pytest.raises(ValueError, match="query dim 151"):
        again.search(queries[:, :151])
    with pytest.raises(ValueError, match="not 'ivf'"):
        PatchIndex.from_bytes(index.to_bytes(), "ivf")
    # banks written before the header: bare faiss bytes of an unpadded index
    legacy = faiss.serialize_index(faiss.IndexFlatIP(152)).tobytes()
    assert PatchIndex.from_bytes(legacy, "exact").dim == 152


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_indexes_are_close(kind):
    rng = np.random.default_rng(2)
    bank = rng.normal(size=(4000, 24)).astype(np.float32)
    queries = bank[:200] + rng.normal(0, 0.05, (200, 24)).astype(np.float32)
    exact = PatchIndex().fit(bank).nearest_distance(queries)
    approx = PatchIndex(kind, nprobe=32).fit(bank).nearest_distance(queries)
    assert np.mean(np.abs(approx - exact) < 1e-5) > 0.9


def test_few_shot_scorer_flags_the_odd_patch_and_masks_background():
    rng = np.random.default_rng(3)
    ref, _ = object_grid(rng)
    test, truth = object_grid(rng)
    test[10, 12] = rng.normal(0, 1, 32) * 5  # a defect inside the object
    test[1, 1] = rng.normal(0, 1, 32) * 5  # clutter on the background
    scorer = FewShotScorer().fit([ref])
    res = scorer.score(test, image_size=(96, 96))
    assert res.max_patch in {(10, 12), (1, 1)}
    assert res.anomaly_map.shape == (96, 96)
    fg = foreground_mask(test, threshold=10.0)
    masked = scorer.score(test, image_size=(96, 96), foreground=fg)
    assert masked.max_patch == (10, 12)
    assert masked.patch_distances[1, 1] == 0.0
    assert 0 < masked.masked_fraction < 1
    clean = scorer.score(object_grid(rng)[0], image_size=(96, 96), foreground=fg)
    assert masked.score > 3 * clean.score


def test_exact_bf16_returns_true_fp32_distances_of_near_best_rows():
    rng = np.random.default_rng(5)
    bank = rng.normal(size=(10000, 64)).astype(np.float32)
    queries = np.concatenate([bank[:50] + rng.normal(0, 0.02, (50, 64)), rng.normal(size=(50, 64))])
    exact = PatchIndex().fit(bank).search(queries)
    fast = PatchIndex("exact_bf16").fit(bank)
    got = fast.search(queries)
    assert np.abs(got.distances - exact.distances).max() < 2e-3
    assert np.mean(got.indices == exact.indices) > 0.95
    # the distance reported is the fp32 distance of the returned row
    bn = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    rows = bn[got.indices[:, 0]]
    assert np.allclose(got.distances[:, 0], 1 - np.sum(qn * rows, axis=1), atol=1e-5)
    again = PatchIndex.from_bytes(fast.to_bytes(), "exact_bf16").search(queries)
    assert np.array_equal(again.indices, got.indices)
