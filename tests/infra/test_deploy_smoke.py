"""prefect.yaml deployed to a real local Prefect server; the nightly-audit deployment is run by a
process worker to completion, offline (infra/deploy_smoke.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from infra import deploy_smoke
from infra.prefect_worker import DEFAULT_POOL
from infra.stack import status

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def test_prefect_yaml_has_a_deployment_per_job() -> None:
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    by_entry = {d["entrypoint"]: d for d in spec["deployments"]}
    nightly = by_entry["flows/audit.py:nightly_audit"]
    assert nightly["schedules"][0]["cron"] == "0 2 * * *"
    assert "schedules" not in by_entry["flows/screen.py:screen_shipment"]  # on demand
    assert by_entry["flows/reevaluate.py:reevaluate_updates"]["schedules"][0]["interval"] > 0
    assert {d["work_pool"]["name"] for d in spec["deployments"]} == {DEFAULT_POOL}


def test_deployment_runs_to_completion_on_a_process_worker(tmp_path, mvtec_root, capsys) -> None:
    state, root = tmp_path / "infra", tmp_path / "pipeline"
    code = deploy_smoke.main(["--state-dir", str(state), "--root", str(root)])
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{") :])
    assert code == 0, out
    assert result["state"] == "COMPLETED" and result["deployment"] == "nightly-audit/nightly"
    (report,) = result["reports"]
    df = pd.read_parquet(report)
    lot_images = [p for p in (root / "incoming").rglob("*.png") if p.is_file()]
    assert len(df) == len(lot_images) and df["error"].isna().all()
    assert set(df.loc[df["image_id"].str.startswith("good/"), "verdict"]) == {"normal"}
    # the services started for the run were stopped again
    assert status(state) == {}
