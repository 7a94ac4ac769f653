"""Tests of tasks/storage.py on a local folder and on a real SeaweedFS."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tasks import storage as st

SETTINGS = {"backbone": "dinov2_vits14", "weights_sha256": "ab" * 32, "resolution": 448}


@pytest.fixture(params=["local", "s3"])
def base(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, st.StorageConfig | None]:
    """A fresh root URI (local dir or S3 bucket prefix) and the storage config to use."""
    if request.param == "local":
        return str(tmp_path / "root"), None
    s3 = request.getfixturevalue("s3")
    return st.join(s3.new_bucket(), "root"), s3.storage


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
