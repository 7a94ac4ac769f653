"""Tests of tasks/map_archive.py on a local folder and on a real SeaweedFS."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import zarr

from anomalydino_core.overlays import render_overlay
from tasks import storage as st
from tasks import zarr_nodes
from tasks.embedding_store import (
    StoreSettingsError,
    image_key,
)
from tasks.map_archive import (
    MapArchive,
    map_sha256,
    write_overlay,
)

SETTINGS = {"backbone": "dinov2_vits14", "weights_sha256": "ab" * 32, "resolution": 448}


@pytest.fixture(params=["local", "s3"])
def base(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, st.StorageConfig | None]:
    """A fresh root URI (local dir or S3 bucket prefix) and the storage config to use."""
    if request.param == "local":
        return str(tmp_path / "root"), None
    s3 = request.getfixturevalue("s3")
    return st.join(s3.new_bucket(), "root"), s3.storage


# --------------------------------------------------------------------------- storage.py


def _die_before_last_step(mp: pytest.MonkeyPatch) -> None:
    """Make every entry write stop (as if the worker were killed) before its last step."""
    write = zarr_nodes.write_steps

    def killed(store, steps):
        write(store, steps[:-1])
        raise RuntimeError("worker killed")

    mp.setattr(zarr_nodes, "write_steps", killed)
    mp.setattr(zarr_nodes, "remove_quietly", lambda store, path: False)  # killed: no clean-up


def test_map_archive_round_trip_and_completeness(base, monkeypatch) -> None:
    root, cfg = base
    uri = st.join(root, "lot-7", "maps.zarr")
    archive = MapArchive.open(uri, {"lot": "lot-7"}, cfg)
    rng = np.random.default_rng(7)
    amap = (rng.random((37, 53)) * 4).astype(np.float32)
    archive.put("img-1", amap, source_uri="s3://raw/img-1.png", attributes={"score": 1.5})
    got = MapArchive.open(uri, {"lot": "lot-7"}, cfg, read_only=True).get("img-1")
    assert got.dtype == np.float16 and got.shape == (37, 53)
    np.testing.assert_array_equal(got, amap.astype(np.float16))
    assert archive.attributes("img-1")["score"] == 1.5
    assert archive.attributes("img-1")["map_sha256"] == map_sha256(amap.astype(np.float16))
    assert archive.holds("img-1", amap) and not archive.holds("img-1", amap * 0.5)
    # a map written before maps carried their hash is compared by value
    legacy = MapArchive.open(st.join(root, "lot-6", "maps.zarr"), {"lot": "lot-6"}, cfg)
    zarr.create_array(
        legacy._store, name=f"maps/{image_key('old')}", data=amap.astype(np.float16),
        chunks=amap.shape, attributes={"image_id": "old", "source_uri": None, "complete": True},
    )  # fmt: skip
    assert "map_sha256" not in legacy.attributes("old")
    assert legacy.holds("old", amap) and not legacy.holds("old", amap * 0.5)
    with pytest.raises(KeyError, match="img-9"):
        archive.holds("img-9", amap)
    assert MapArchive.open(uri, None, cfg).settings == {"lot": "lot-7"}
    with pytest.raises(StoreSettingsError, match="lot"):
        MapArchive.open(uri, {"lot": "lot-8"}, cfg)

    with monkeypatch.context() as mp:
        _die_before_last_step(mp)
        with pytest.raises(OSError, match="img-2"):
            archive.put("img-2", amap)
        # replacing a map and dying halfway hides the old one
        with pytest.raises(OSError, match="img-1"):
            archive.put("img-1", amap[:5])
    assert archive.ids() == [] and not archive.has("img-2") and not archive.has("img-1")
    with pytest.raises(KeyError, match="img-2"):
        archive.get("img-2")
    archive.put("img-2", amap * 0)
    archive.put("img-1", amap[:5])
    assert archive.ids() == ["img-1", "img-2"]
    assert float(archive.get("img-2").max()) == 0.0
    np.testing.assert_array_equal(archive.get("img-1"), amap[:5].astype(np.float16))


def test_overlay_jpeg(base) -> None:
    root, cfg = base
    h, w = 20, 30
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 1] = 200
    amap = np.zeros((h, w), np.float32)
    amap[:, w // 2 :] = 5.0  # right half at vmax, left half at vmin
    uri = st.join(root, "overlays", "img-1.png.jpg")
    write_overlay(uri, image, amap, vmin=0.0, vmax=5.0, storage=cfg)
    data = st.read_bytes(uri, cfg)
    assert data[:3] == b"\xff\xd8\xff"  # JPEG
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    rgb = cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
    assert rgb.shape == (h, w, 3)
    # quality 90: within a few levels of the rendered overlay away from the colour edge
    expected = render_overlay(image, amap, 0.0, 5.0).astype(int)
    assert np.abs(rgb.astype(int) - expected)[:, : w // 2 - 4].max() <= 6
    assert np.abs(rgb.astype(int) - expected)[:, w // 2 + 4 :].max() <= 6
    jet = cv2.applyColorMap(np.array([[0, 255]], np.uint8), cv2.COLORMAP_JET)[0, :, ::-1]
    expected_left = np.rint(0.5 * image[0, 0] + 0.5 * jet[0])  # vmin: JET dark blue
    expected_right = np.rint(0.5 * image[0, -1] + 0.5 * jet[1])  # vmax: JET dark red
    np.testing.assert_allclose(rgb[0, 0], expected_left, atol=6)
    np.testing.assert_allclose(rgb[0, -1], expected_right, atol=6)
    assert st.list_files(st.join(root, "overlays"), None, cfg) == [uri]
    with pytest.raises(ValueError, match=r"img-2\.png.*map shape"):
        write_overlay(st.join(root, "img-2.png"), image, amap[:5], 0.0, 1.0, cfg)
