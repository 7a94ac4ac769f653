"""What failed writes leave behind: embedding entries without their group metadata are never
left (and old ones are repaired without warnings); map folders without a report are removed."""

from __future__ import annotations

import errno
import os
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import zarr

import tasks.embedding_store as es
from flows import leftovers
from tasks.embedding_store import EmbeddedImage, EmbeddingStore, image_key
from tasks.map_archive import MapArchive


def _item(i: int) -> EmbeddedImage:
    rng = np.random.default_rng(i)
    return EmbeddedImage(
        f"lots/l/{i}.png",
        f"/data/{i}.png",
        f"{i:064x}",
        (40, 40),
        rng.normal(size=(3, 3, 8)).astype(np.float32),
        rng.random((3, 3)) > 0.5,
    )


def _disk_full_on(monkeypatch, failing) -> None:
    """Every local write put into place (``os.replace``: zarr's ``LocalStore`` and the direct
    writes of ``tasks/zarr_nodes.py``) of a path that ``failing`` picks fails with ENOSPC."""
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if failing(str(dst)):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def _listing_warnings(uri: str) -> list[str]:
    """What zarr says while listing every node of the store (as any reader would)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        group = zarr.open_group(uri, mode="r")
        list(group.members(max_depth=None))
    return [str(w.message) for w in caught]


def test_a_failed_entry_write_leaves_no_node_without_metadata(tmp_path, monkeypatch) -> None:
    uri = str(tmp_path / "e.zarr")
    store = EmbeddingStore.open(uri, {"backbone": "x"})
    store.put(_item(0))
    # the feature chunk: after the group, before the flag
    _disk_full_on(monkeypatch, lambda path: path.endswith("/c/0/0/0"))
    with pytest.raises(OSError, match="writing image 'lots/l/1.png' failed") as info:
        store.put(_item(1))
    assert info.value.__cause__.errno == errno.ENOSPC
    assert not (tmp_path / "e.zarr" / "images" / image_key("lots/l/1.png")).exists()
    assert _listing_warnings(uri) == []
    assert store.ids() == ["lots/l/0.png"] and not store.has("lots/l/1.png")


def test_a_store_with_entries_lacking_their_group_repairs_itself(tmp_path, monkeypatch) -> None:
    uri = str(tmp_path / "e.zarr")
    store = EmbeddingStore.open(uri, {"backbone": "x"})
    for i in range(3):
        store.put(_item(i))
    # what versions writing the group last left after a failed write: arrays, no group
    broken = tmp_path / "e.zarr" / "images" / image_key("lots/l/1.png")
    os.remove(broken / "zarr.json")
    assert any("not recognized" in w for w in _listing_warnings(uri))

    monkeypatch.setattr(es, "_REPAIRED", set())  # a new process
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reopened = EmbeddingStore.open(uri, {"backbone": "x"})
        assert reopened.ids() == ["lots/l/0.png", "lots/l/2.png"]
    assert not broken.exists() and _listing_warnings(uri) == []
    reopened.put(_item(1))  # embedded again as usual
    assert reopened.has("lots/l/1.png", _item(1).content_sha256)


def test_a_failed_map_write_leaves_no_chunk_without_metadata(tmp_path, monkeypatch) -> None:
    uri = str(tmp_path / "m.zarr")
    archive = MapArchive.open(uri, {"run": "r"})
    # the map's metadata, after its chunk
    _disk_full_on(monkeypatch, lambda path: path.endswith(f"/maps/{image_key('a.png')}/zarr.json"))
    with pytest.raises(OSError, match="writing map"):
        archive.put("a.png", np.ones((8, 8), np.float32))
    assert list((tmp_path / "m.zarr" / "maps").iterdir()) == [tmp_path / "m.zarr/maps/zarr.json"]
    assert _listing_warnings(uri) == []


def _run_id(when: datetime, suffix: str) -> str:
    return f"{when:%Y%m%dT%H%M%SZ}-{suffix}"


def test_map_folders_without_a_report_are_removed_once_stale(tmp_path: Path) -> None:
    now = datetime(2026, 5, 1, 2, 0, tzinfo=UTC)
    maps, reports = tmp_path / "maps" / "p" / "lot", tmp_path / "reports" / "p" / "lot"
    old = now - leftovers.STALE_AFTER - timedelta(minutes=1)
    runs = {
        "reported": _run_id(old, "aaaaaaaa"),
        "killed": _run_id(old, "bbbbbbbb"),
        "running": _run_id(now - timedelta(minutes=5), "cccccccc"),
    }
    for run in runs.values():
        (maps / run / "anomaly_maps.zarr").mkdir(parents=True)
        (maps / run / "anomaly_maps.zarr" / "zarr.json").write_text("{}")
    reports.mkdir(parents=True)
    (reports / f"{runs['reported']}.parquet").write_bytes(b"x")

    removed = leftovers.remove_stale_runs(str(maps), str(reports), None, now=now)
    assert removed == [runs["killed"]]
    assert sorted(p.name for p in maps.iterdir()) == sorted([runs["reported"], runs["running"]])
    assert leftovers.remove_stale_runs(str(tmp_path / "none"), str(reports), None) == []


def test_a_failed_flow_run_removes_its_map_folder_unless_reported(tmp_path: Path) -> None:
    a, b = tmp_path / "maps" / "a", tmp_path / "maps" / "b"
    for folder in (a, b):
        (folder / "overlays").mkdir(parents=True)
    (tmp_path / "b.parquet").write_bytes(b"report")
    leftovers.started("run-1", str(tmp_path / "a.parquet"), str(a), None)
    leftovers.started("run-1", str(tmp_path / "b.parquet"), str(b), None)
    leftovers.drop_partial_outputs(None, SimpleNamespace(id="run-1"), None)
    assert not a.exists() and b.exists()
    leftovers.drop_partial_outputs(None, SimpleNamespace(id="run-2"), None)  # nothing started
