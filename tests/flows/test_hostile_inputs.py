"""Unattended nights: hostile files in a lot and secrets in a config.

A real local audit (efficientnet_lite0 at 224) of a lot holding, besides two bottle images,
decompression-bomb headers (PNG and JPEG claiming 60000 x 60000), a 20000 x 20000 PNG of zeros,
an image smaller than one patch, symbolic links out of the lot (to a file and to a folder) and a
text file: the bombs and links are error rows, the rest is scored and the report written.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from flows.config import PipelineConfig, StorageSettings
from tasks.listing import list_image_files
from tasks.storage import StorageConfig, list_files, scan_files
from tests.core.images_data import jpeg_with_header, png_with_header, zeros_png
from tests.pipeline_data import fast_config, reference_files, write_local

SECRET = b"\x89PNG\r\n\x1a\n not a real image: a secret outside the lot"


def _outside(base: Path) -> Path:
    """A folder outside the lot with a secret file and an image."""
    out = base / "outside"
    out.mkdir()
    (out / "secret.png").write_bytes(SECRET)
    cv2.imwrite(str(out / "image.png"), np.full((64, 64, 3), 90, np.uint8))
    return out


def _links(lot: Path, outside: Path) -> None:
    lot.mkdir(parents=True, exist_ok=True)
    os.symlink(outside / "secret.png", lot / "secret.png")
    os.symlink("/etc/passwd", lot / "passwd.png")
    os.symlink(outside, lot / "linked_folder")
    os.symlink(lot / "missing.png", lot / "broken.png")


# ------------------------------------------------------------------------------ the listing


def test_listing_never_follows_links_out_of_the_prefix(tmp_path: Path) -> None:
    outside = _outside(tmp_path)
    lot = tmp_path / "lot"
    _links(lot, outside)
    cv2.imwrite(str(lot / "a.png"), np.zeros((32, 32, 3), np.uint8))
    os.symlink(lot / "a.png", lot / "inside.png")  # a link inside the lot is fine
    (lot / ".partial.png.tmp").write_bytes(b"x")
    os.mkfifo(lot / "pipe.png")  # reading it would block forever

    found = scan_files(str(lot), scope="the lot")
    assert found.files == [str(lot / "a.png"), str(lot / "inside.png")]
    assert set(found.refused) == {str(lot / n) for n in ("secret.png", "passwd.png", "broken.png")}
    assert (
        "symbolic link points outside the lot (to /etc/passwd)"
        in found.refused[str(lot / "passwd.png")]
    )
    assert "broken symbolic link" in found.refused[str(lot / "broken.png")]
    assert found.dir_links == {str(lot / "linked_folder"): str(outside)}
    assert set(found.skipped) == {str(lot / ".partial.png.tmp"), str(lot / "pipe.png")}
    assert list_files(str(lot), [".png"]) == found.files
    # links may be allowed to point into named folders (the demo links into the MVTec data)
    allowed = scan_files(str(lot), link_roots=[str(outside)])
    assert str(lot / "secret.png") in allowed.files and str(lot / "passwd.png") in allowed.refused
    # the prefix itself may be a link (the demo's lot is one)
    os.symlink(lot, tmp_path / "lot-link")
    assert len(scan_files(str(tmp_path / "lot-link")).files) == 2


def test_every_ignored_file_is_named_in_the_log(tmp_path: Path, caplog) -> None:
    outside = _outside(tmp_path)
    lot = tmp_path / "lot"
    _links(lot, outside)
    for name in ("a.png", "notes.txt", "sub/readme.md", "b.JPG"):
        (lot / name).parent.mkdir(parents=True, exist_ok=True)
        (lot / name).write_bytes(b"x")
    log = logging.getLogger("test-listing")
    with caplog.at_level(logging.INFO, logger="test-listing"):
        listing = list_image_files(str(lot), StorageSettings(), log, "the lot")
    names = {n: str(lot / n) for n in ("a.png", "b.JPG", "broken.png", "passwd.png", "secret.png")}
    assert listing.uris == sorted(names.values())
    assert set(listing.refused) == {names["broken.png"], names["passwd.png"], names["secret.png"]}
    text = caplog.text
    for ignored in ("notes.txt", "sub/readme.md"):
        assert f"{lot / ignored}: ignored (no image suffix" in text
    assert f"{lot / 'linked_folder'}: symbolic link to a folder ({outside})" in text
    assert f"{names['passwd.png']}: error row: symbolic link points outside the lot" in text


# --------------------------------------------------------------------------- credentials


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"storage": {"client_kwargs": {"aws_secret_access_key": "SECRETX"}}}, "aws_secret"),
        ({"storage": {"client_kwargs": {"aws_session_token": "SECRETX"}}}, "aws_session_token"),
        ({"root": "s3://AKIAKEY:SECRETX@bucket/pipeline"}, "root"),
        ({"incoming": "s3://AKIAKEY:SECRETX@raw/in"}, "incoming"),
        ({"storage": {"endpoint_url": "http://u:SECRETX@127.0.0.1:8333"}}, "endpoint_url"),
        ({"model": {"weights": "s3://k:SECRETX@b/w.pth"}}, "weights"),
    ],
)
def test_credentials_in_the_config_are_refused_without_echoing_them(config, field) -> None:
    with pytest.raises(ValidationError) as err:
        PipelineConfig.model_validate(config)
    message = str(err.value)
    assert field in message and "SECRETX" not in message
    assert "credentials are not accepted" in message or "user info" in message


def test_storage_config_refuses_secret_client_kwargs() -> None:
    with pytest.raises(ValueError, match="client_kwargs.aws_secret_access_key"):
        StorageConfig(client_kwargs={"aws_secret_access_key": "x"})
    StorageConfig(key="k", secret="s", client_kwargs={"verify": False})  # env-style: fine


def test_cli_refuses_credentials_with_exit_code_2(tmp_path: Path, capsys) -> None:
    from flows.cli import main

    rc = main(["audit", "--product", "p", "--lot", "l", "--root", "s3://AK:SECRETX@b/p"])
    err = capsys.readouterr().err
    assert rc == 2 and "root" in err and "SECRETX" not in err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("storage:\n  client_kwargs:\n    aws_secret_access_key: SECRETX\n")
    rc = main(["audit", "--product", "p", "--lot", "l", "--config", str(cfg)])
    err = capsys.readouterr().err
    assert rc == 2 and "storage.client_kwargs.aws_secret_access_key" in err
    assert "SECRETX" not in err


# ------------------------------------------------------------------------ a real audit


@pytest.mark.slow
def test_hostile_lot_gives_error_rows_and_a_report(prefect_harness, mvtec_root, tmp_path) -> None:
    from flows.audit import audit_lot

    root = tmp_path / "pipeline"
    write_local(root / "references" / "bottle" / "v1", reference_files(mvtec_root))
    lot = root / "incoming" / "bottle" / "lot-1"
    bottle = mvtec_root / "bottle" / "test"
    tiny = cv2.imencode(".png", np.full((8, 8, 3), 200, np.uint8))[1].tobytes()
    write_local(
        lot,
        {
            "good/000.png": (bottle / "good" / "000.png").read_bytes(),
            "broken_large/000.png": (bottle / "broken_large" / "000.png").read_bytes(),
            "bomb.png": png_with_header(60000, 60000),
            "bomb.jpg": jpeg_with_header(60000, 60000),
            "zeros.png": zeros_png(20000, 20000),
            "tiny.png": tiny,
            "notes.txt": b"not an image",
        },
    )
    _links(lot, _outside(tmp_path))
    os.symlink(lot / "good" / "000.png", lot / "good" / "inside-link.png")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("prefect").addHandler(handler)
    try:
        cfg = PipelineConfig.model_validate(fast_config(str(root)))
        summary = audit_lot("bottle", "lot-1", cfg)
    finally:
        logging.getLogger("prefect").removeHandler(handler)

    df = pd.read_parquet(summary.report_uri).set_index("image_id")
    errors = df["error"]
    assert errors["bomb.png"] == (
        "bomb.png: 60000 x 60000 = 3.6 G pixels exceeds the limit of 67,108,864 pixels "
        "(decode_max_pixels)"
    )
    assert "bomb.jpg: 60000 x 60000 = 3.6 G pixels exceeds" in errors["bomb.jpg"]
    assert "zeros.png: 20000 x 20000 = 400 M pixels exceeds" in errors["zeros.png"]
    assert "tiny.png: 8 x 8 pixels is smaller than one 16 px patch" in errors["tiny.png"]
    assert (
        "passwd.png: symbolic link points outside the lot (to /etc/passwd)" in errors["passwd.png"]
    )
    assert "secret.png: symbolic link points outside the lot" in errors["secret.png"]
    assert "broken.png: broken symbolic link" in errors["broken.png"]
    scored = df[df["error"].isna()]
    assert sorted(scored.index) == ["broken_large/000.png", "good/000.png", "good/inside-link.png"]
    assert scored["score"].notna().all()
    assert (df.loc[errors.notna().to_numpy(), "verdict"] == "error").all()
    # the files outside the lot were never read: no hash, no size of theirs in the report
    hashes = set(df["content_sha256"].dropna())
    assert hashlib.sha256(SECRET).hexdigest() not in hashes
    assert hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest() not in hashes
    assert df.loc[["passwd.png", "secret.png"], "file_size_bytes"].isna().all()
    assert "linked_folder" not in "".join(df.index)
    log = "\n".join(records)
    assert f"{lot / 'linked_folder'}: symbolic link to a folder" in log
    assert f"{lot / 'notes.txt'}: ignored (no image suffix" in log
    assert summary.n_images == 10 and summary.n_errors == 7
