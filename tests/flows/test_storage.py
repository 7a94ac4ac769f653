"""Storage layer, embedding store and map archive, on a local dir and on real SeaweedFS S3."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import zarr
from zarr.storage import LocalStore

from tasks import storage as st
from tasks import zarr_nodes
from tasks.embedding_store import (
    EmbeddedImage,
    EmbeddingStore,
    StoreSettingsError,
    feature_compressor,
    image_key,
)
from tasks.map_archive import (
    MapArchive,
    map_compressor,
    map_sha256,
    render_overlay,
    write_overlay_png,
)

SETTINGS = {"backbone": "dinov2_vits14", "weights_sha256": "ab" * 32, "resolution": 448}


@pytest.fixture(params=["local", "s3"])
def base(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, st.StorageConfig | None]:
    """A fresh root URI (local dir or S3 bucket prefix) and the storage config to use."""
    if request.param == "local":
        return str(tmp_path / "root"), None
    s3 = request.getfixturevalue("s3")
    return st.join(s3.new_bucket(), "root"), s3.storage


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _image(image_id: str, seed: int = 0, grid=(8, 6), dim: int = 16, mask=True) -> EmbeddedImage:
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((*grid, dim)).astype(np.float16)
    m = rng.random(grid) > 0.3 if mask else None
    return EmbeddedImage(
        image_id=image_id,
        source_uri=f"s3://raw/{image_id}",
        content_sha256=_sha(f"{image_id}:{seed}".encode()),
        image_size=(grid[0] * 14 + 3, grid[1] * 14 + 5),
        features=feats,
        mask=m,
    )


# --------------------------------------------------------------------------- storage.py


def test_storage_config_hides_secret_and_reads_env() -> None:
    cfg = st.StorageConfig.from_env(
        {
            "AWS_ENDPOINT_URL": "http://127.0.0.1:1",
            "AWS_ACCESS_KEY_ID": "k",
            "AWS_SECRET_ACCESS_KEY": "s3cr3t",
        }
    )
    assert (cfg.endpoint_url, cfg.key, cfg.secret) == ("http://127.0.0.1:1", "k", "s3cr3t")
    assert "s3cr3t" not in repr(cfg) and "s3cr3t" not in str(cfg)
    opts = cfg.s3_options()
    assert opts["client_kwargs"] == {"endpoint_url": "http://127.0.0.1:1"}
    assert "region_name" not in opts["client_kwargs"]
    assert st.StorageConfig.from_env({}, anon=True).s3_options()["anon"] is True


def test_join_and_schemes() -> None:
    assert st.join("s3://b/x/", "y", "/z.png") == "s3://b/x/y/z.png"
    assert st.join("/data", "a") == "/data/a"
    assert st.scheme_of("/data") == "file" and st.scheme_of("S3://b") == "s3"
    with pytest.raises(ValueError, match=r"\.\."):
        st.join("s3://b", "../etc")


def test_atomic_write_read_exists_list(base) -> None:
    root, cfg = base
    uri = st.join(root, "a", "one.png")
    assert not st.exists(uri, cfg)
    st.atomic_write_bytes(uri, b"first", cfg)
    st.atomic_write_bytes(uri, b"second", cfg)
    st.atomic_write_bytes(st.join(root, "a", "b", "two.PNG"), b"2", cfg)
    st.atomic_write_bytes(st.join(root, "a", "notes.txt"), b"t", cfg)
    assert st.read_bytes(uri, cfg) == b"second"
    assert st.exists(uri, cfg)
    assert st.list_files(root, [".png"], cfg) == [
        st.join(root, "a", "b", "two.PNG"),
        st.join(root, "a", "one.png"),
    ]
    assert len(st.list_files(root, None, cfg)) == 3
    assert st.list_files(st.join(root, "missing"), None, cfg) == []
    with pytest.raises(FileNotFoundError, match="nope.png"):
        st.read_bytes(st.join(root, "nope.png"), cfg)


def test_copy_object(base) -> None:
    root, cfg = base
    source, target = st.join(root, "a", "x.png"), st.join(root, "b", "y.png")
    st.atomic_write_bytes(source, b"png bytes", cfg)
    st.copy_object(source, target, cfg)
    assert st.read_bytes(target, cfg) == b"png bytes"
    with pytest.raises(FileNotFoundError, match="missing.png"):
        st.copy_object(st.join(root, "missing.png"), st.join(root, "z.png"), cfg)
    assert not st.exists(st.join(root, "z.png"), cfg)


def test_local_atomic_write_failure_leaves_old_content(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "x.bin"
    st.atomic_write_bytes(str(target), b"old")

    def boom(*_a, **_k):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk gone"):
        st.atomic_write_bytes(str(target), b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


def test_zarr_store_round_trip(base) -> None:
    root, cfg = base
    uri = st.join(root, "plain.zarr")
    group = zarr.open_group(st.zarr_store(uri, cfg), mode="w", attributes={"k": 1})
    group.create_array("a", data=np.arange(12, dtype=np.float16).reshape(3, 4))
    ro = zarr.open_group(st.zarr_store(uri, cfg, read_only=True), mode="r")
    assert ro.attrs["k"] == 1
    np.testing.assert_array_equal(ro["a"][...], np.arange(12, dtype=np.float16).reshape(3, 4))


# --------------------------------------------------------------------------- embedding store


def test_embedding_store_round_trip(base) -> None:
    root, cfg = base
    uri = st.join(root, "emb.zarr")
    store = EmbeddingStore.open(uri, SETTINGS, cfg)
    a, b = _image("lot1/a.png", seed=1), _image("lot1/b.png", seed=2, mask=False)
    store.put(a)
    store.put(b)

    reopened = EmbeddingStore.open(uri, dict(SETTINGS), cfg, create=False, read_only=True)
    assert reopened.settings == SETTINGS
    assert reopened.ids() == ["lot1/a.png", "lot1/b.png"]
    got = reopened.get("lot1/a.png")
    assert got.features.dtype == np.float16
    np.testing.assert_array_equal(got.features, a.features)
    assert got.mask is not None and got.mask.dtype == np.bool_
    np.testing.assert_array_equal(got.mask, a.mask)
    assert (got.image_size, got.source_uri, got.content_sha256) == (
        a.image_size,
        a.source_uri,
        a.content_sha256,
    )
    assert got.grid == (8, 6)
    assert reopened.get("lot1/b.png").mask is None
    with pytest.raises(KeyError, match="lot1/zzz.png"):
        reopened.get("lot1/zzz.png")
    with pytest.raises(PermissionError):
        reopened.put(a)


def test_embedding_store_float32_input_stored_as_float16(tmp_path: Path) -> None:
    store = EmbeddingStore.open(str(tmp_path / "e.zarr"), SETTINGS)
    item = _image("x")
    f32 = item.features.astype(np.float32) + np.float32(1e-4)
    store.put(EmbeddedImage("x", "u", item.content_sha256, (10, 10), f32, None))
    got = store.get("x").features
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, f32.astype(np.float16))
    too_big = np.full((2, 2, 3), 1e6, dtype=np.float32)
    with pytest.raises(ValueError, match="'big'.*not finite"):
        store.put(EmbeddedImage("big", "u", item.content_sha256, (10, 10), too_big, None))
    assert not store.has("big")


def test_embedding_store_settings_mismatch_raises(base) -> None:
    root, cfg = base
    uri = st.join(root, "emb.zarr")
    EmbeddingStore.open(uri, SETTINGS, cfg).put(_image("a"))
    with pytest.raises(StoreSettingsError, match="resolution: stored 448 != requested 224"):
        EmbeddingStore.open(uri, {**SETTINGS, "resolution": 224}, cfg)
    with pytest.raises(StoreSettingsError, match="extra"):
        EmbeddingStore.open(uri, {**SETTINGS, "extra": 1}, cfg)
    # settings=None inspects whatever is there
    assert EmbeddingStore.open(uri, None, cfg).settings == SETTINGS
    with pytest.raises(FileNotFoundError, match="other.zarr"):
        EmbeddingStore.open(st.join(root, "other.zarr"), SETTINGS, cfg, create=False)
    with pytest.raises(StoreSettingsError, match="not an anomalydino embedding_store"):
        MapArchive.open(st.join(root, "maps.zarr"), {}, cfg)  # create a map archive ...
        EmbeddingStore.open(st.join(root, "maps.zarr"), SETTINGS, cfg)  # ... and misuse it


def test_embedding_store_incomplete_invisible_then_overwritten(base, monkeypatch) -> None:
    root, cfg = base
    store = EmbeddingStore.open(st.join(root, "emb.zarr"), SETTINGS, cfg)
    item = _image("killed.png", seed=3)

    # The run dies after the arrays are written but before the completion flag.
    with monkeypatch.context() as mp:
        _die_before_last_step(mp)
        with pytest.raises(OSError, match="killed.png"):
            store.put(item)
    # The partial entry's arrays are really there, but nobody sees them.
    path = f"images/{image_key('killed.png')}"
    partial = zarr.open_array(store._store, path=f"{path}/features", mode="r")
    np.testing.assert_array_equal(partial[...], item.features)
    assert not store.has("killed.png")
    assert not store.has("killed.png", item.content_sha256)
    assert store.ids() == []
    with pytest.raises(KeyError):
        store.get("killed.png")
    # A re-run overwrites it.
    store.put(item)
    assert store.has("killed.png", item.content_sha256)
    np.testing.assert_array_equal(store.get("killed.png").features, item.features)
    # Replacing a complete entry and dying halfway hides the old one: never old and new mixed.
    changed = _image("killed.png", seed=4, grid=(3, 5))
    with monkeypatch.context() as mp:
        _die_before_last_step(mp)
        with pytest.raises(OSError, match="killed.png"):
            store.put(changed)
    assert not store.has("killed.png") and store.ids() == []
    store.put(changed)
    assert store.get("killed.png").features.shape == (3, 5, 16)


def test_embedding_store_has_is_idempotence_key(base) -> None:
    root, cfg = base
    store = EmbeddingStore.open(st.join(root, "emb.zarr"), SETTINGS, cfg)
    item = _image("p.png", seed=4)
    assert not store.has("p.png", item.content_sha256)
    store.put(item)
    assert store.has("p.png", item.content_sha256)
    assert store.has("p.png")
    assert not store.has("p.png", _sha(b"changed"))
    # same settings, another handle: still there; a changed image replaces the entry
    again = EmbeddingStore.open(st.join(root, "emb.zarr"), SETTINGS, cfg)
    assert again.has("p.png", item.content_sha256)
    changed = _image("p.png", seed=5, grid=(4, 4))
    again.put(changed)
    assert again.has("p.png", changed.content_sha256)
    assert not again.has("p.png", item.content_sha256)
    assert again.get("p.png").features.shape == (4, 4, 16)
    assert again.ids() == ["p.png"]


def test_embedded_image_validation() -> None:
    item = _image("v")
    with pytest.raises(ValueError, match="'v'.*mask shape"):
        EmbeddedImage("v", "u", item.content_sha256, (1, 1), item.features, np.ones((2, 2), bool))
    with pytest.raises(ValueError, match="mask must be bool"):
        EmbeddedImage("v", "u", item.content_sha256, (1, 1), item.features, item.mask.astype(int))
    with pytest.raises(ValueError, match="content_sha256"):
        EmbeddedImage("v", "u", "xyz", (1, 1), item.features)
    with pytest.raises(ValueError, match=r"\(gh, gw, C\)"):
        EmbeddedImage("v", "u", item.content_sha256, (1, 1), item.features[0])


# --------------------------------------------------------------------------- map archive


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


def _die_before_last_step(mp: pytest.MonkeyPatch) -> None:
    """Make every entry write stop (as if the worker were killed) before its last step."""
    write = zarr_nodes.write_steps

    def killed(store, steps):
        write(store, steps[:-1])
        raise RuntimeError("worker killed")

    mp.setattr(zarr_nodes, "write_steps", killed)
    mp.setattr(zarr_nodes, "remove_quietly", lambda store, path: False)  # killed: no clean-up


def test_overlay_png(base) -> None:
    root, cfg = base
    h, w = 20, 30
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 1] = 200
    amap = np.zeros((h, w), np.float32)
    amap[:, w // 2 :] = 5.0  # right half at vmax, left half at vmin
    uri = st.join(root, "overlays", "img-1.png")
    write_overlay_png(uri, image, amap, vmin=0.0, vmax=5.0, storage=cfg)
    decoded = cv2.imdecode(np.frombuffer(st.read_bytes(uri, cfg), np.uint8), cv2.IMREAD_COLOR)
    rgb = cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
    assert rgb.shape == (h, w, 3)
    np.testing.assert_array_equal(rgb, render_overlay(image, amap, 0.0, 5.0))
    jet = cv2.applyColorMap(np.array([[0, 255]], np.uint8), cv2.COLORMAP_JET)[0, :, ::-1]
    expected_left = np.rint(0.5 * image[0, 0] + 0.5 * jet[0])  # vmin: JET dark blue
    expected_right = np.rint(0.5 * image[0, -1] + 0.5 * jet[1])  # vmax: JET dark red
    np.testing.assert_allclose(rgb[0, 0], expected_left, atol=1)
    np.testing.assert_allclose(rgb[0, -1], expected_right, atol=1)
    assert st.list_files(st.join(root, "overlays"), None, cfg) == [uri]
    with pytest.raises(ValueError, match=r"img-2\.png.*map shape"):
        write_overlay_png(st.join(root, "img-2.png"), image, amap[:5], 0.0, 1.0, cfg)
