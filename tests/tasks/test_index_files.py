"""A patch index as a file pair: round trips (exact and exact_bf16) and a truncated file."""

from __future__ import annotations

import numpy as np
import pytest

from anomalydino_core.memory_bank import PatchIndex
from tasks.index_files import load_index, save_index


def test_patch_index_file_round_trip_and_truncated_file(tmp_path):
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(500, 16)).astype(np.float32)
    queries = rng.normal(size=(40, 16)).astype(np.float32)
    index = PatchIndex().fit(bank * rng.uniform(0.5, 3.0, (500, 1)))
    got = index.nearest_distance(queries)
    save_index(index, tmp_path / "bank.faiss")
    loaded = load_index(tmp_path / "bank.faiss")
    assert loaded.size == 500 and np.array_equal(loaded.nearest_distance(queries), got)
    (tmp_path / "bank.faiss").write_bytes((tmp_path / "bank.faiss").read_bytes()[:1000])
    with pytest.raises(Exception):  # noqa: B017 - faiss raises RuntimeError on truncated data
        load_index(tmp_path / "bank.faiss")


def test_exact_bf16_index_file_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    bank = rng.normal(size=(10000, 64)).astype(np.float32)
    queries = np.concatenate([bank[:50] + rng.normal(0, 0.02, (50, 64)), rng.normal(size=(50, 64))])
    fast = PatchIndex("exact_bf16").fit(bank)
    got = fast.search(queries)
    save_index(fast, tmp_path / "b.faiss")
    again = load_index(tmp_path / "b.faiss").search(queries)
    assert np.array_equal(again.indices, got.indices)
