"""Re-evaluation after a reference update, and zero-shot screening, on real images."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from anomalydino_core.thresholds import MIN_SCREENING_IMAGES
from flows.audit import audit_lot
from flows.config import PipelineConfig
from flows.reevaluate import reevaluate_updates
from flows.screen import screen_shipment
from tasks.embedding_store import EmbeddingStore, image_key
from tasks.report import list_reports, report_metadata
from tests.pipeline_data import fast_config, lot_files, reference_files, write_local

pytestmark = pytest.mark.slow


def entry_mtime(store: EmbeddingStore, image_id: str) -> float:
    return Path(store.uri, "images", image_key(image_id), "features", "zarr.json").stat().st_mtime


def test_reference_update_rescores_stored_lots(prefect_harness, tmp_path, mvtec_root) -> None:
    root = tmp_path / "pipeline"
    refs = root / "references" / "bottle"
    write_local(refs / "v1", reference_files(mvtec_root, ("000.png", "001.png")))
    write_local(root / "incoming" / "bottle" / "lot-1", lot_files(mvtec_root))
    cfg = PipelineConfig.model_validate(fast_config(str(root)))
    old = audit_lot("bottle", "lot-1", cfg)
    assert reevaluate_updates(cfg) == []  # nothing newer than v1 yet

    shutil.copytree(refs / "v1", refs / "v2")  # a new version: v1 plus one more image
    write_local(refs / "v2", reference_files(mvtec_root, ("005.png",)))
    store = EmbeddingStore.open(old.embeddings_uri, None)
    lot_ids = [i for i in store.ids() if i.startswith("lots/")]
    before = {i: entry_mtime(store, i) for i in lot_ids}
    assert len(lot_ids) == 4

    (result,) = reevaluate_updates(cfg)
    assert result.version == "v2" and result.n_images == 7
    (lot,) = result.lots
    assert lot.reference_version == "v2" and lot.n_reused == 4 and lot.n_computed == 0
    reports = list_reports(cfg.layout().lot_reports("bottle", "lot-1"))
    assert reports == sorted([old.report_uri, lot.report_uri])  # beside the old one
    new = pd.read_parquet(lot.report_uri).set_index("image_id")
    assert (new["reference_version"] == "v2").all() and (new["shots"] == 3).all()
    assert new.loc["zero_bytes.png", "verdict"] == "error"
    # its lot page, and the metadata the page shows (the threshold's reason, the references)
    meta = report_metadata(lot.report_uri)
    assert Path(lot.html_uri).is_file() and f"lot page {lot.html_uri}" in result.text()
    assert meta["threshold_reason"] and meta["reevaluates"] == old.report_uri
    assert len(meta["references"]) == 3 and meta["overlay_scale"][1] == 2 * meta["threshold"]
    # the lot was not re-embedded: only the new reference image was added to the store
    assert sorted(i for i in store.ids() if i.startswith("lots/")) == sorted(lot_ids)
    ref_views = [i for i in store.ids() if i.startswith("references/")]
    assert len({i.split("/")[1] for i in ref_views}) == 3  # one content sha256 per image
    assert len(ref_views) == 3 * 8  # each in 8 rotations, for the masking test
    assert {i: entry_mtime(store, i) for i in lot_ids} == before

    changes = pd.read_parquet(result.changes_uri)
    assert len(changes) == 7 and set(changes["new_reference_version"]) == {"v2"}
    assert changes["verdict_changed"].sum() == len(result.changed)
    assert set(changes["old_run_id"]) == {old.run_id}
    # the same numbers as auditing the lot against v2 directly
    direct = audit_lot("bottle", "lot-1", cfg, version="v2")
    pd.testing.assert_series_equal(
        new["score"], pd.read_parquet(direct.report_uri).set_index("image_id")["score"]
    )
    assert reevaluate_updates(cfg) == []  # done: the latest reports use v2


def test_zero_shot_screening(prefect_harness, tmp_path, mvtec_root) -> None:
    root = tmp_path / "pipeline"
    shipment = root / "incoming" / "bottle" / "shipment-7"
    write_local(shipment, lot_files(mvtec_root))
    # enough readable images for a threshold from the shipment itself (MIN_SCREENING_IMAGES)
    good = mvtec_root / "bottle" / "test" / "good"
    extra = [f"good/{i:03d}.png" for i in range(2, 2 + MIN_SCREENING_IMAGES - 4)]
    write_local(shipment, {rel: (good / rel.split("/")[1]).read_bytes() for rel in extra})
    cfg = PipelineConfig.model_validate(fast_config(str(root), zero_shot_blocks=3))
    summary = screen_shipment("bottle", "shipment-7", cfg)
    df = pd.read_parquet(summary.report_uri).set_index("image_id")
    assert summary.method == "zero_shot" and (df["method"] == "zero_shot").all()
    assert df["reference_version"].isna().all() and summary.n_errors == 3
    assert df.loc["truncated.png", "verdict"] == "error"
    ok = df[df["error"].isna()]
    assert ok["threshold_source"].eq("shipment_low_decile").all()
    assert ok.loc["broken_large/000.png", "score"] > ok.loc["good/000.png", "score"]
    meta = report_metadata(summary.report_uri)
    assert Path(summary.html_uri).is_file() and meta["threshold_reason"]
    assert meta["overlay_scale"][1] == pytest.approx(2 * meta["threshold"])
    # one block gives the same scores as three (the split never changes a result)
    one = PipelineConfig.model_validate(fast_config(str(root), zero_shot_blocks=1))
    again = screen_shipment("bottle", "shipment-7", one)
    assert again.n_reused == MIN_SCREENING_IMAGES
    pd.testing.assert_series_equal(
        ok["score"],
        pd.read_parquet(again.report_uri).set_index("image_id")["score"].dropna(),
        rtol=1e-6,
    )
