"""Tests of tasks/zarr_nodes.py on a local folder and on a real SeaweedFS."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.storage import LocalStore

from tasks import zarr_nodes
from tasks.embedding_store import (
    feature_compressor,
)
from tasks.map_archive import (
    map_compressor,
)

SETTINGS = {"backbone": "dinov2_vits14", "weights_sha256": "ab" * 32, "resolution": 448}


# --------------------------------------------------------------------------- storage.py


def test_direct_zarr_writes_equal_zarrs_own(tmp_path: Path) -> None:
    """``tasks.zarr_nodes`` writes byte for byte the objects zarr's API writes."""
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((7, 5, 24)).astype(np.float16)
    mask = rng.random((7, 5)) > 0.5
    amap = (rng.random((33, 21)) * 3).astype(np.float16)
    by_zarr, direct = LocalStore(tmp_path / "zarr"), LocalStore(tmp_path / "direct")
    group = zarr.create_group(by_zarr, path="e", attributes={"x": [1, 2], "complete": True})
    group.create_array("features", data=feats, chunks=feats.shape, compressors=feature_compressor())
    group.create_array("mask", data=mask, chunks=mask.shape)
    zarr.create_array(
        by_zarr, name="m", data=amap, chunks=amap.shape, compressors=map_compressor(),
        attributes={"score": 0.5},
    )  # fmt: skip
    files: dict[str, bytes] = {}
    for path, data, compressor, attrs in [
        ("e/features", feats, feature_compressor(), None),
        ("e/mask", mask, None, None),
        ("m", amap, map_compressor(), {"score": 0.5}),
    ]:
        chunk, meta = zarr_nodes.array_files(path, data, compressor=compressor, attributes=attrs)
        files |= chunk | meta
    files |= zarr_nodes.group_files("e", {"x": [1, 2], "complete": True})
    zarr_nodes.write_steps(direct, [files])
    written = sorted(p.relative_to(tmp_path / "zarr") for p in (tmp_path / "zarr").rglob("*"))
    written = [p for p in written if (tmp_path / "zarr" / p).is_file() and str(p) != "zarr.json"]
    assert sorted(map(str, written)) == sorted(files)
    for rel in written:
        assert (tmp_path / "direct" / rel).read_bytes() == (tmp_path / "zarr" / rel).read_bytes()
    np.testing.assert_array_equal(zarr.open_array(direct, path="m", mode="r")[...], amap)
    with pytest.raises(ValueError, match="BloscCodec"):
        zarr_nodes.array_files("z", amap, compressor=zarr.codecs.ZstdCodec())


def test_direct_zarr_reads_equal_zarrs_own(tmp_path: Path) -> None:
    """``zarr_nodes.decode_array`` reads what zarr wrote, including a chunk zarr left out
    because it was all fill value (stores written before the direct writes)."""
    rng = np.random.default_rng(1)
    store = LocalStore(tmp_path)
    arrays = {
        "f": (rng.standard_normal((4, 3, 8)).astype(np.float16), feature_compressor()),
        "zero": (np.zeros((4, 3, 8), np.float16), feature_compressor()),
        "m": (rng.random((4, 3)) > 0.5, None),
        "none": (np.zeros((4, 3), bool), None),
        "map": ((rng.random((9, 7)) * 2).astype(np.float16), map_compressor()),
    }
    for name, (data, compressor) in arrays.items():
        zarr.create_array(
            store, name=name, data=data, chunks=data.shape, compressors=compressor or "auto"
        )
    assert not (tmp_path / "zero" / "c").exists()  # zarr skipped the all-fill chunk
    for name, (data, _) in arrays.items():
        meta, chunk = zarr_nodes.read_objects(
            store, [f"{name}/zarr.json", f"{name}/{zarr_nodes.chunk_key(data.ndim)}"]
        )
        got = zarr_nodes.decode_array(meta, chunk, name)
        assert got.dtype == data.dtype and got.shape == data.shape
        np.testing.assert_array_equal(got, data)
    zarr.create_array(store, name="tiled", shape=(8, 8), chunks=(4, 4), dtype="float16")
    (meta,) = zarr_nodes.read_objects(store, ["tiled/zarr.json"])
    with pytest.raises(ValueError, match="tiled: not a one-chunk"):
        zarr_nodes.decode_array(meta, None, "tiled")


def test_local_steps_are_written_in_place_in_order_and_never_into_a_read_only_store(
    tmp_path: Path, monkeypatch
) -> None:
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    chunk, meta = zarr_nodes.array_files("a/x", data, attributes={"k": 1})
    store = LocalStore(tmp_path)
    assert not zarr_nodes.exists(store, "a/x/zarr.json")
    placed: list[str] = []
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        placed.append(Path(dst).relative_to(tmp_path).as_posix())
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    zarr_nodes.write_steps(store, [chunk, meta])
    assert placed == [*chunk, *meta]  # every object renamed into place, the chunk first
    assert zarr_nodes.exists(store, "a/x/zarr.json")
    np.testing.assert_array_equal(zarr.open_array(store, path="a/x", mode="r")[:], data)
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]  # no temp file left
    other = zarr_nodes.array_files("a/y", data)
    with pytest.raises(ValueError, match="read-only"):
        zarr_nodes.write_steps(LocalStore(tmp_path, read_only=True), list(other))
    assert not (tmp_path / "a" / "y").exists()
