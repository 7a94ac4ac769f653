"""The audit with every URI on s3:// against a real SeaweedFS on loopback; outputs read back
with plain pandas and zarr from the same URIs (credentials only from the environment)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import zarr

from flows.audit import audit_lot
from flows.config import PipelineConfig
from tasks import storage as st
from tests.pipeline_data import (
    BAD_FILES,
    N_DEFECTIVE,
    N_LOT,
    N_READABLE,
    fast_config,
    lot_files,
    reference_files,
)

pytestmark = pytest.mark.slow


def upload(base: str, files: dict[str, bytes], cfg: st.StorageConfig) -> None:
    for rel, data in files.items():
        st.atomic_write_bytes(st.join(base, rel), data, cfg)


def test_audit_on_s3_reads_back_with_pandas_and_zarr(
    prefect_harness, s3, bucket, mvtec_root, monkeypatch, caplog
) -> None:
    for key, value in s3.service.env().items():
        monkeypatch.setenv(key, value)
    root = st.join(bucket, "pipeline")
    upload(st.join(root, "references", "bottle", "v1"), reference_files(mvtec_root), s3.storage)
    upload(st.join(root, "incoming", "bottle", "lot-s3"), lot_files(mvtec_root), s3.storage)
    cfg = PipelineConfig.model_validate(fast_config(root))

    summary = audit_lot("bottle", "lot-s3", cfg)
    assert summary.report_uri.startswith(f"{bucket}/pipeline/reports/bottle/lot-s3/")
    assert summary.maps_uri.startswith("s3://") and summary.embeddings_uri.startswith("s3://")
    assert (summary.n_images, summary.n_errors, summary.n_flagged) == (
        N_LOT,
        len(BAD_FILES),
        N_DEFECTIVE,
    )

    df = pd.read_parquet(summary.report_uri)  # plain pandas, s3fs from the AWS_* variables
    assert len(df) == N_LOT and df["image_uri"].str.startswith("s3://").all()
    ok = df[df["error"].isna()].set_index("image_id")
    amap = zarr.open_array(ok.loc["broken_large/000.png", "map_uri"], mode="r")
    assert amap.dtype == np.float16 and amap.shape == (900, 900)
    group = zarr.open_group(summary.maps_uri, mode="r")
    assert len(list(group["maps"].arrays())) == N_READABLE
    overlay = ok.loc["broken_large/000.png", "overlay_uri"]
    assert overlay.startswith("s3://") and st.exists(overlay, s3.storage)
    # the lot page and its pictures beside the report; copied down, it opens as it is
    assert summary.html_uri == summary.report_uri.removesuffix(".parquet") + ".html"
    from flows.lot_page import local_copy

    page = local_copy(summary.html_uri, s3.storage)
    pictures = list((page.parent / page.name.replace(".html", "_files")).rglob("*.jpg"))
    assert page.is_file() and len(pictures) == 2 * N_DEFECTIVE + 3  # cards + references
    emb = zarr.open_group(summary.embeddings_uri, mode="r")
    assert emb.attrs["anomalydino"]["settings"]["backbone"] == "efficientnet_lite0"

    again = audit_lot("bottle", "lot-s3", cfg)
    assert (again.n_reused, again.n_computed) == (4, 0)
    pd.testing.assert_series_equal(
        df.set_index("image_id")["score"],
        pd.read_parquet(again.report_uri).set_index("image_id")["score"],
    )

    # secrets never reach outputs or logs
    secret = s3.service.secret_key
    assert secret not in df.to_csv() and secret not in caplog.text
    bank = st.read_bytes(st.join(summary.bank_uri, "bank.json"), s3.storage).decode()
    assert secret not in bank and json.loads(bank)["product"] == "bottle"
    assert secret not in cfg.model_dump_json()
