"""The evaluate command on the real MVTec bottle images: bad files, missing DINOv2 weights."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow


def _small_category(mvtec_root: Path, dst: Path) -> Path:
    src = mvtec_root / "bottle"
    cat = dst / "bottle"
    (cat / "train" / "good").mkdir(parents=True)
    for p in sorted((src / "train" / "good").glob("*.png"))[:2]:
        os.symlink(p, cat / "train" / "good" / p.name)
    for kind, n in (("good", 3), ("broken_large", 3)):
        (cat / "test" / kind).mkdir(parents=True)
        for p in sorted((src / "test" / kind).glob("*.png"))[:n]:
            os.symlink(p, cat / "test" / kind / p.name)
    shutil.copytree(
        src / "ground_truth" / "broken_large", cat / "ground_truth" / "broken_large", symlinks=True
    )
    (cat / "test" / "broken_large" / "900.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (cat / "test" / "good" / "notes.txt").write_text("not an image")
    (cat / "test" / "good" / "empty.png").write_bytes(b"")
    return dst


def test_cli_reports_bad_files_by_name_and_goes_on(mvtec_root, tmp_path):
    data = _small_category(mvtec_root, tmp_path / "data")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "flows.cli",
        "evaluate",
        "--data",
        str(data),
        "--category",
        "bottle",
        "--shots",
        "1",
        "--seeds",
        "0,1",
        "--backbone",
        "efficientnet_lite0",
        "--resolution",
        "224",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr
    for name in ("900.png", "notes.txt", "empty.png"):
        assert name in proc.stderr
    df = pd.read_parquet(out / "metrics.parquet")
    assert list(df["seed"]) == [0, 1] and (df["n_test_images"] == 6).all()
    assert (df["n_unreadable"] == 3).all()
    for col in (
        "image_auroc",
        "pixel_aupro",
        "embed_ms_per_image",
        "score_ms_per_image",
        "weights_sha256",
        "resolution",
        "preprocess",
    ):
        assert df[col].notna().all(), col
    md = (out / "metrics.md").read_text()
    assert "| 1 | 2 |" in md and "image_auroc" in md
    assert "image_auroc" in proc.stdout


def test_cli_without_dinov2_weights_fails_fast_with_one_message(mvtec_root, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", ANOMALYDINO_WEIGHTS_DIR=str(tmp_path))
    cmd = [
        sys.executable,
        "-m",
        "flows.cli",
        "evaluate",
        "--data",
        str(mvtec_root),
        "--category",
        "bottle",
        "--shots",
        "1",
        "--seeds",
        "0",
        "--backbone",
        "dinov2_vits14",
        "--out",
        str(tmp_path / "out"),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=60, cwd=Path(__file__).parents[2]
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--weights" in errors[0] and str(tmp_path) in errors[0]
    assert not (tmp_path / "out").exists()
