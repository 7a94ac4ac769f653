"""Tests of tasks/embedding_store.py on a local folder and on a real SeaweedFS."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import zarr

from tasks import storage as st
from tasks import zarr_nodes
from tasks.embedding_store import (
    EmbeddedImage,
    EmbeddingStore,
    StoreSettingsError,
    image_key,
)
from tasks.map_archive import (
    MapArchive,
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


def _die_before_last_step(mp: pytest.MonkeyPatch) -> None:
    """Make every entry write stop (as if the worker were killed) before its last step."""
    write = zarr_nodes.write_steps

    def killed(store, steps):
        write(store, steps[:-1])
        raise RuntimeError("worker killed")

    mp.setattr(zarr_nodes, "write_steps", killed)
    mp.setattr(zarr_nodes, "remove_quietly", lambda store, path: False)  # killed: no clean-up


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


def test_entries_written_with_the_codec_before_read_beside_new_ones(tmp_path, monkeypatch):
    """Stores written before the features' codec changed (blosc-zstd, byte shuffle) stay
    readable: each array names its codec, new entries get lz4 with bit shuffle."""
    from zarr.codecs import BloscCodec

    import tasks.embedding_store as store_module

    uri = str(tmp_path / "e.zarr")
    old, new = _image("old", seed=1), _image("new", seed=2)
    with monkeypatch.context() as mp:
        mp.setattr(
            store_module,
            "feature_compressor",
            lambda: BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"),
        )
        EmbeddingStore.open(uri, SETTINGS).put(old)
    store = EmbeddingStore.open(uri, SETTINGS)
    store.put(new)
    codecs = {}
    for item in (old, new):
        np.testing.assert_array_equal(store.get(item.image_id).features, item.features)
        node = zarr.open_array(f"{uri}/images/{image_key(item.image_id)}/features", mode="r")
        codecs[item.image_id] = node.metadata.to_dict()["codecs"][-1]["configuration"]
    assert (codecs["old"]["cname"], codecs["old"]["shuffle"]) == ("zstd", "shuffle")
    assert (codecs["new"]["cname"], codecs["new"]["shuffle"]) == ("lz4", "bitshuffle")


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
