"""Batched zero-shot mutual scoring against a plain dense reference (METHOD.md section 4)."""

from __future__ import annotations

import numpy as np
import pytest

from anomalydino_core.scoring import anomaly_map, top1p_mean
from anomalydino_core.zero_shot import (
    LazyFeatureSource,
    MutualScoringConfig,
    score_mutual,
    split_query_indices,
)

SHAPES = [(6, 5), (6, 5), (4, 7), (6, 5), (5, 5), (6, 5), (3, 9)]
DIM = 16


def make_grids(seed: int = 0, dtype: type = np.float32) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(4, DIM))  # a few shared directions: a realistic, clustered tail
    grids = []
    for gh, gw in SHAPES:
        mix = rng.normal(size=(gh * gw, 4)) @ base + 0.7 * rng.normal(size=(gh * gw, DIM))
        grids.append(mix.reshape(gh, gw, DIM).astype(dtype))
    return grids


def make_masks(seed: int = 1) -> list[np.ndarray | None]:
    rng = np.random.default_rng(seed)
    masks: list[np.ndarray | None] = [rng.random(s) > 0.3 for s in SHAPES]
    masks[3] = None
    return masks


# ---------------------------------------------------------------------- dense reference


def dense_reference(
    grids: list[np.ndarray],
    statistic: str,
    alpha: float,
    masks: list[np.ndarray | None] | None = None,
) -> list[np.ndarray]:
    """Per-image patch-score grids from the full distance matrix (float64)."""
    flat = [g.reshape(-1, g.shape[-1]).astype(np.float64) for g in grids]
    flat = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in flat]
    out = []
    for j, x in enumerate(flat):
        bank = np.concatenate([y for i, y in enumerate(flat) if i != j])
        dist = 1.0 - x @ bank.T
        m = bank.shape[0]
        if statistic == "quantile":
            scores = np.quantile(dist, alpha, axis=1, method="inverted_cdf")
        else:  # the authors' code: mean of the distances strictly below the k-th smallest
            k = max(1, int(alpha * m))
            kth = np.sort(dist, axis=1)[:, k - 1]
            below = dist < kth[:, None]
            n_below = below.sum(axis=1)
            mean_below = (dist * below).sum(axis=1) / np.maximum(n_below, 1)
            scores = np.where(n_below > 0, mean_below, kth)
        if masks is not None and masks[j] is not None:
            scores = np.where(masks[j].ravel(), scores, 0.0)
        out.append(scores.reshape(grids[j].shape[:2]))
    return out


BLOCKINGS = [
    {},  # derived from the default budget: one tile
    {"memory_budget_bytes": 20_000},  # tiny budget: bank streamed, many small tiles and groups
    {"query_block_rows": 7, "bank_block_rows": 13},
    {"query_block_rows": 3, "bank_block_rows": 5},
    {"query_block_rows": 64, "bank_block_rows": 50},
]


@pytest.mark.parametrize("statistic", ["code_mean", "quantile"])
@pytest.mark.parametrize("alpha", [0.001, 0.03, 0.2])
@pytest.mark.parametrize("blocking", BLOCKINGS)
def test_matches_dense_reference(statistic: str, alpha: float, blocking: dict) -> None:
    grids = make_grids()
    masks = make_masks()
    sizes = [(gh * 14 + 3, gw * 14 + 1) for gh, gw in SHAPES]
    config = MutualScoringConfig(statistic=statistic, alpha=alpha, **blocking)
    results = score_mutual(grids, masks=masks, image_sizes=sizes, config=config)
    reference = dense_reference(grids, statistic, alpha, masks)
    assert [r.index for r in results] == list(range(len(grids)))
    for r, ref in zip(results, reference, strict=True):
        assert r.patch_scores.dtype == np.float32 and r.patch_scores.shape == ref.shape
        np.testing.assert_allclose(r.patch_scores, ref, atol=1e-5, rtol=0)
        assert r.score == pytest.approx(top1p_mean(ref), abs=1e-5)
        ref_map = anomaly_map(ref, sizes[r.index], sigma=4.0)
        assert r.anomaly_map is not None and r.anomaly_map.shape == sizes[r.index]
        np.testing.assert_allclose(r.anomaly_map, ref_map, atol=1e-5, rtol=0)
        assert r.max_patch == np.unravel_index(np.argmax(ref), ref.shape)


def test_block_sizes_do_not_change_results() -> None:
    grids = make_grids(3, np.float16)
    runs = [
        score_mutual(grids, config=MutualScoringConfig(alpha=0.05, **blocking))
        for blocking in BLOCKINGS
    ]
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            np.testing.assert_allclose(a.patch_scores, b.patch_scores, atol=1e-6, rtol=0)
            assert a.score == pytest.approx(b.score, abs=1e-6)


@pytest.mark.parametrize("statistic", ["code_mean", "quantile"])
def test_split_queries_equal_one_call(statistic: str) -> None:
    grids = make_grids(5)
    masks = make_masks(6)
    # bit-exact on CPU (a GPU may pick shape-dependent matmul algorithms: equal to ~1e-7 there)
    config = MutualScoringConfig(statistic=statistic, alpha=0.03, device="cpu")
    whole = score_mutual(grids, masks=masks, config=config)
    parts = split_query_indices(len(grids), 4)
    assert len(parts) == 4 and sorted(i for p in parts for i in p) == list(range(len(grids)))
    split = [
        r for p in parts for r in score_mutual(grids, query_indices=p, masks=masks, config=config)
    ]
    for a, b in zip(whole, split, strict=True):
        assert a.index == b.index
        assert a.score == b.score
        np.testing.assert_array_equal(a.patch_scores, b.patch_scores)
    # an arbitrary order and subset gives the same numbers too
    subset = score_mutual(grids, query_indices=[6, 0, 3], masks=masks, config=config)
    assert [r.index for r in subset] == [6, 0, 3]
    for r in subset:
        np.testing.assert_array_equal(r.patch_scores, whole[r.index].patch_scores)


def test_own_image_is_excluded() -> None:
    """Image 0 is orthogonal to all others: with its own patches in the bank it would score 0."""
    rng = np.random.default_rng(7)
    grids = [np.zeros((4, 4, 8), np.float32) for _ in range(5)]
    grids[0][..., :4] = rng.normal(size=(4, 4, 4))
    for g in grids[1:]:
        g[..., 4:] = rng.normal(size=(4, 4, 4))
    for statistic in ("code_mean", "quantile"):
        for blocking in BLOCKINGS:
            config = MutualScoringConfig(statistic=statistic, alpha=0.05, **blocking)
            res = score_mutual(grids, config=config)
            np.testing.assert_allclose(res[0].patch_scores, 1.0, atol=1e-6)
            assert res[0].score == pytest.approx(1.0, abs=1e-6)
            assert all(r.score < 0.9 for r in res[1:])


def test_masked_patches_score_zero_and_bank_unchanged() -> None:
    grids = make_grids(11)
    masks = make_masks(12)
    config = MutualScoringConfig(alpha=0.03, device="cpu")  # bit-exact comparisons below
    plain = score_mutual(grids, config=config)
    masked = score_mutual(grids, masks=masks, config=config)
    for i, (a, b) in enumerate(zip(plain, masked, strict=True)):
        mask = np.ones(SHAPES[i], bool) if masks[i] is None else masks[i]
        assert np.all(b.patch_scores[~mask] == 0.0)
        np.testing.assert_array_equal(b.patch_scores[mask], a.patch_scores[mask])
    empty = [np.zeros(s, bool) for s in SHAPES]
    res = score_mutual(grids, masks=empty, config=config)
    assert all(r.score == 0.0 and not r.patch_scores.any() for r in res)


def test_tied_distances_match_reference() -> None:
    """Duplicated images make many exactly tied distances at the k-th smallest."""
    rng = np.random.default_rng(2)
    proto = rng.normal(size=(3, 3, 8)).astype(np.float32)
    grids = [proto.copy() for _ in range(4)] + [rng.normal(size=(3, 3, 8)).astype(np.float32)]
    for statistic in ("code_mean", "quantile"):
        config = MutualScoringConfig(statistic=statistic, alpha=0.05)
        res = score_mutual(grids, config=config)
        ref = dense_reference(grids, statistic, 0.05)
        for r, g in zip(res, ref, strict=True):
            np.testing.assert_allclose(r.patch_scores, g, atol=1e-5)


def test_split_query_indices() -> None:
    assert split_query_indices(7, 4) == [[0, 1], [2, 3], [4], [5, 6]]
    assert split_query_indices(2, 4) == [[0], [1]]
    assert split_query_indices(5, 1) == [[0, 1, 2, 3, 4]]


def test_lazy_source_and_float16_match_in_memory() -> None:
    grids = make_grids(4, np.float16)
    loads: list[int] = []

    def loader(i: int) -> np.ndarray:
        loads.append(i)
        return grids[i]

    source = LazyFeatureSource([g.shape[:2] for g in grids], loader)
    config = MutualScoringConfig(alpha=0.03, device="cpu")  # bit-exact comparisons below
    eager = score_mutual(grids, config=config)
    lazy = score_mutual(source, query_indices=[1, 4], config=config)
    assert set(loads) == set(range(len(grids)))
    for r in lazy:
        np.testing.assert_array_equal(r.patch_scores, eager[r.index].patch_scores)
    ref = dense_reference([g.astype(np.float32) for g in grids], "code_mean", 0.03)
    for r, g in zip(eager, ref, strict=True):
        np.testing.assert_allclose(r.patch_scores, g, atol=1e-5)


def test_bf16_close_to_fp32() -> None:
    grids = make_grids(9)
    fp32 = score_mutual(grids, config=MutualScoringConfig(alpha=0.03))
    bf16 = score_mutual(grids, config=MutualScoringConfig(alpha=0.03, precision="bf16"))
    for a, b in zip(fp32, bf16, strict=True):
        assert b.score == pytest.approx(a.score, rel=1e-2)
        np.testing.assert_allclose(b.patch_scores, a.patch_scores, rtol=2e-2, atol=1e-3)


def test_without_sizes_no_maps_and_validation() -> None:
    grids = make_grids()
    res = score_mutual(grids, query_indices=[2])
    assert len(res) == 1 and res[0].anomaly_map is None and res[0].index == 2
    with pytest.raises(ValueError):
        score_mutual(grids[:1])
    with pytest.raises(ValueError):
        score_mutual(grids, config=MutualScoringConfig(image_score="max_map"))
    with pytest.raises(ValueError):
        score_mutual(grids, masks=[np.ones((2, 2), bool)] * len(grids))
    with pytest.raises(IndexError):
        score_mutual(grids, query_indices=[7])
    with pytest.raises(ValueError):
        MutualScoringConfig(statistic="median")  # type: ignore[arg-type]
    assert score_mutual(grids, query_indices=[]) == []


def test_measured_tiles_on_a_large_batch_give_the_blocked_results() -> None:
    """5 x 1024 patches, tiles measured (tune_tiles): the scores are those of small explicit
    blocks, up to float rounding."""
    from anomalydino_core import zero_shot

    rng = np.random.default_rng(9)
    base = rng.normal(size=(32, 32, 16))
    grids = [(base + rng.normal(0, 0.5, base.shape)).astype(np.float32) for _ in range(5)]
    config = MutualScoringConfig(device="cpu", tune_tiles=True)
    tuned = score_mutual(grids, query_indices=[0, 3], config=config)
    blocked = score_mutual(
        grids,
        query_indices=[0, 3],
        config=MutualScoringConfig(device="cpu", query_block_rows=256, bank_block_rows=192),
    )
    for a, b in zip(tuned, blocked, strict=True):
        np.testing.assert_allclose(a.patch_scores, b.patch_scores, rtol=0, atol=1e-6)
    precision, side = zero_shot.tuned_tile("fp32", 16, 4, 4000, 4096)
    assert precision == "fp32" and side in zero_shot.TILE_SIDES
    assert zero_shot.tuned_tile("fp32", 16, 4, 4000, 1024) == ("fp32", 1024)  # budget's side
    precision, side = zero_shot.tuned_tile("bf16", 16, 4, 4000, 4096)
    assert precision in ("bf16", "fp32") and side in zero_shot.TILE_SIDES
