"""CPU top-1 search of the flat patch indexes (``nn_search``): every method against a dense
reference, agreement between methods, independence of batching, the measured choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomalydino_core import nn_search
from anomalydino_core.few_shot import FewShotScorer
from anomalydino_core.memory_bank import PatchIndex


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _dense(bank: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 reference: nearest row and its cosine distance."""
    sims = _unit(queries) @ _unit(bank).T
    return sims.argmax(axis=1), 1.0 - sims.max(axis=1)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(11)
    bank = rng.normal(size=(5000, 152)).astype(np.float32) * rng.uniform(0.5, 3, (5000, 1))
    near = bank[rng.integers(0, 5000, 400)] + rng.normal(0, 0.3, (400, 152))
    queries = np.concatenate([near, rng.normal(size=(500, 152))]).astype(np.float32)
    return bank.astype(np.float32), queries


@pytest.mark.parametrize(
    ("kind", "method"),
    [("exact", "faiss"), ("exact", "torch"), ("exact_bf16", "faiss"), ("exact_bf16", "torch")],
)
def test_fp32_methods_match_a_dense_reference(data, kind, method):
    bank, queries = data
    index = PatchIndex(kind, search_method=method).fit(bank)
    assert index.dim == 152 and index._index.d == 192  # faiss holds padded rows; torch a view
    got = index.search(queries)
    ref_idx, ref_dist = _dense(bank, queries)
    assert np.array_equal(got.indices[:, 0], ref_idx)
    assert np.abs(got.distances[:, 0] - ref_dist).max() < 1e-6
    assert got.distances.dtype == np.float32 and got.indices.dtype == np.int64


def test_methods_agree_to_the_bit_and_batching_does_not_matter(data):
    bank, queries = data
    faiss_ = PatchIndex(search_method="faiss").fit(bank).nearest_distance(queries)
    torch_ = PatchIndex(search_method="torch").fit(bank).nearest_distance(queries)
    assert np.array_equal(faiss_, torch_)
    auto = PatchIndex().fit(bank)
    whole = auto.nearest_distance(queries)
    parts = np.concatenate([auto.nearest_distance(queries[:7]), auto.nearest_distance(queries[7:])])
    assert np.array_equal(whole, parts) and np.array_equal(whole, faiss_)


def test_blocked_fp32_kernel_over_uneven_blocks():
    rng = np.random.default_rng(3)
    bank = _unit(rng.normal(size=(1001, 24))).astype(np.float32)
    queries = _unit(rng.normal(size=(333, 24))).astype(np.float32)
    idx = nn_search.top1_fp32(
        torch.from_numpy(queries), torch.from_numpy(bank), query_block=50, bank_block=77
    )
    assert np.array_equal(idx.numpy(), (queries @ bank.T).argmax(axis=1))


def test_bf16_screen_keeps_the_best_row_of_each_block_and_reranks_in_fp32():
    rng = np.random.default_rng(5)
    bank = rng.normal(size=(10000, 64)).astype(np.float32)
    queries = np.concatenate([bank[:50] + rng.normal(0, 0.02, (50, 64)), rng.normal(size=(50, 64))])
    queries = queries.astype(np.float32)
    fast = PatchIndex("exact_bf16", search_method="bf16").fit(bank)
    fast.bf16_block = 3000  # blocks 0-2999, ..., 9000-9999
    got = fast.search(queries)
    ref_idx, ref_dist = _dense(bank, queries)
    assert np.abs(got.distances[:, 0] - ref_dist).max() < 2e-3
    assert np.mean(got.indices[:, 0] == ref_idx) > 0.95
    # the distance is the fp32 distance of the returned row
    bn, qn = _unit(bank), _unit(queries)
    rows = bn[got.indices[:, 0]]
    assert np.allclose(got.distances[:, 0], 1 - np.sum(qn * rows, axis=1), atol=1e-6)
    q16 = torch.from_numpy(qn.astype(np.float32)).to(torch.bfloat16)
    b16 = torch.from_numpy(bn.astype(np.float32)).to(torch.bfloat16)
    cand = nn_search.bf16_candidates(q16, b16, query_block=64, block=3000)
    assert cand.shape == (100, 4)
    dense16 = (q16 @ b16.T).float()
    for j, b0 in enumerate(range(0, 10000, 3000)):
        col = dense16[:, b0 : b0 + 3000]
        picked = dense16.gather(1, cand[:, j : j + 1])[:, 0]
        assert torch.equal(picked, col.max(dim=1).values)  # a best row of its block


def test_small_searches_use_torch_and_the_choice_is_measured_once(data):
    bank, queries = data
    index = PatchIndex().fit(bank)
    assert index.method_for(3) == "torch"  # 3 x 5000 < the probe: no calibration
    assert index._calibration is None
    method = index.method_for(len(queries))
    assert method in ("faiss", "torch") and index._calibration is not None
    assert set(index._calibration.ms) == {"faiss", "torch"}
    assert PatchIndex().fit(bank).method_for(len(queries)) == method  # cached per process
    assert PatchIndex(search_method="faiss").fit(bank).method_for(len(queries)) == "faiss"


def test_measure_times_every_candidate():
    cal = nn_search.measure(("faiss", "torch", "bf16"), 40, 64, rounds=1)
    assert set(cal.ms) == {"faiss", "torch", "bf16"} and cal.method in cal.ms
    assert all(ms > 0 for ms in cal.ms.values())
    fastest = min(cal.ms, key=cal.ms.__getitem__)
    if cal.method != fastest:  # the default (first candidate) stays unless clearly beaten
        assert cal.method == "faiss" and cal.ms[fastest] >= nn_search.MARGIN * cal.ms["faiss"]


def test_unknown_or_misplaced_search_method():
    with pytest.raises(ValueError, match="unknown search method"):
        PatchIndex(search_method="blas")
    with pytest.raises(ValueError, match="exact_bf16 index only"):
        PatchIndex("exact", search_method="bf16")


def test_loaded_index_searches_like_the_fitted_one(data):
    bank, queries = data
    index = PatchIndex("exact_bf16", search_method="bf16").fit(bank)
    again = PatchIndex.from_bytes(index.to_bytes(), "exact_bf16", search_method="bf16")
    a, b = index.search(queries), again.search(queries)
    assert np.array_equal(a.indices, b.indices) and np.array_equal(a.distances, b.distances)


def test_tall_grid_is_scored_patch_by_patch():
    """A non-square (20 x 50) query grid against a bank of other shapes: the dense reference."""
    rng = np.random.default_rng(8)
    refs = [rng.normal(size=(20, 50, 32)).astype(np.float32), rng.normal(size=(50, 20, 32))]
    scorer = FewShotScorer().fit([r.astype(np.float32) for r in refs])
    grid = rng.normal(size=(20, 50, 32)).astype(np.float32)
    fg = rng.random((20, 50)) > 0.3
    (patch,) = scorer.patch_distances([grid], [fg])
    bank = np.concatenate([r.reshape(-1, 32) for r in refs])
    _, ref = _dense(bank, grid.reshape(-1, 32))
    assert patch.shape == (20, 50)
    assert np.abs(patch[fg] - ref.reshape(20, 50)[fg]).max() < 1e-6
    assert (patch[~fg] == 0).all()
