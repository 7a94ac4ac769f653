"""A real audit process killed (SIGKILL) halfway: nothing half-written is visible, and the next
run reuses what was finished and embeds only the rest."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from flows.audit import audit_lot
from flows.config import PipelineConfig
from tasks.embedding_store import EmbeddingStore
from tasks.report import list_reports
from tests.pipeline_data import reference_files, write_local

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def test_killed_run_resumes_where_it_stopped(prefect_harness, tmp_path, mvtec_root) -> None:
    root = tmp_path / "pipeline"
    write_local(root / "references" / "bottle" / "v1", reference_files(mvtec_root))
    good = mvtec_root / "bottle" / "test" / "good"
    lot = {f"img-{i:02d}.png": (good / f"{i:03d}.png").read_bytes() for i in range(12)}
    write_local(root / "incoming" / "bottle" / "lot-k", lot)
    overrides = {
        "root": str(root),
        "model": {"backbone": "efficientnet_lite0", "resolution": 448, "threads": 2},
        "runtime": {"chunk_size": 1},
        "products": {"bottle": {"rotation": "informed"}},
    }
    cfg = PipelineConfig.model_validate(overrides)
    cmd = [sys.executable, "-m", "flows.cli", "audit", "--product", "bottle", "--lot", "lot-k"]
    cmd += ["--root", str(root), "--backbone", "efficientnet_lite0", "--resolution", "448"]
    cmd += ["--chunk-size", "1", "--threads", "2"]
    env = {**os.environ, "PREFECT_API_URL": prefect_harness}
    env["ANOMALYDINO_CONFIG"] = ""
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    stores = root / "embeddings" / "bottle"
    done_at_kill = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            found = list(stores.glob("*.zarr")) if stores.is_dir() else []
            if found:
                try:  # the audit may be between creating the folder and its metadata
                    store = EmbeddingStore.open(str(found[0]), None, read_only=True)
                except FileNotFoundError:
                    time.sleep(0.02)
                    continue
                ids = [i for i in store.ids() if "lots/" in i]
                if len(ids) >= 3:
                    os.killpg(proc.pid, signal.SIGKILL)
                    done_at_kill = ids
                    break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, "the audit finished before it could be killed"
    assert 3 <= len(done_at_kill) < 12
    assert list_reports(cfg.layout().lot_reports("bottle", "lot-k")) == []  # no partial report

    resumed = audit_lot("bottle", "lot-k", cfg)
    store = EmbeddingStore.open(resumed.embeddings_uri, None)
    assert resumed.n_images == 12 and resumed.n_errors == 0
    assert resumed.n_reused >= len(done_at_kill)  # everything finished before the kill
    assert resumed.n_reused + resumed.n_computed == 12
    assert len([i for i in store.ids() if i.startswith("lots/")]) == 12
    again = audit_lot("bottle", "lot-k", cfg)
    assert again.n_reused == 12
    pd.testing.assert_series_equal(
        pd.read_parquet(resumed.report_uri)["score"], pd.read_parquet(again.report_uri)["score"]
    )
