"""The audit flow for real: a Prefect server (test harness), real bottle images, real files.

A small lot (2 good, 2 defective, plus an unreadable file, a truncated PNG and a zero-byte file)
is audited against 3 references at 224 px with efficientnet_lite0.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr

from flows.audit import audit_lot, nightly_audit
from flows.config import PipelineConfig
from flows.runtime import with_runner
from tasks.embed import SourceImage
from tasks.embed_images import embed_images
from tasks.embedding_store import EmbeddingStore
from tasks.report import REPORT_SCHEMA
from tests.pipeline_data import (
    BAD_FILES,
    N_DEFECTIVE,
    N_LOT,
    N_READABLE,
    REFERENCES,
    fast_config,
    lot_files,
    reference_files,
    write_local,
)

pytestmark = pytest.mark.slow


def make_root(base: Path, mvtec_root: Path, lots=("lot-1",)) -> Path:
    root = base / "pipeline"
    write_local(root / "references" / "bottle" / "v1", reference_files(mvtec_root))
    for lot in lots:
        write_local(root / "incoming" / "bottle" / lot, lot_files(mvtec_root))
    return root


@pytest.fixture(scope="module")
def audited(prefect_harness, mvtec_root, tmp_path_factory):
    """The lot audited twice on the local runner: (config, first summary, second summary)."""
    root = make_root(tmp_path_factory.mktemp("audit"), mvtec_root)
    cfg = PipelineConfig.model_validate(fast_config(str(root)))
    first = audit_lot("bottle", "lot-1", cfg)
    second = audit_lot("bottle", "lot-1", cfg)
    return cfg, first, second


def scores(report_uri: str) -> pd.Series:
    df = pd.read_parquet(report_uri)
    return df.set_index("image_id")["score"]


def test_report_rows_errors_and_verdicts(audited) -> None:
    cfg, first, _ = audited
    assert pq.read_schema(first.report_uri).remove_metadata() == REPORT_SCHEMA
    df = pd.read_parquet(first.report_uri)
    assert list(df["image_id"]) == sorted(df["image_id"])
    assert len(df) == N_LOT and first.n_images == N_LOT and first.n_errors == len(BAD_FILES)
    errors = df.set_index("image_id")["error"]
    assert "not a recognised image format" in errors["unreadable.png"]
    assert "cannot decode image" in errors["truncated.png"]
    assert "empty file (0 bytes)" in errors["zero_bytes.png"]
    bad = df[df["error"].notna()]
    assert (bad["verdict"] == "error").all() and bad["score"].isna().all()
    ok = df[df["error"].isna()].set_index("image_id")
    assert ok["score"].notna().all() and (ok["embedding_reused"] == False).all()  # noqa: E712
    assert list(ok.loc[["good/000.png", "good/001.png"], "verdict"]) == ["normal", "normal"]
    assert list(ok.loc[["broken_large/000.png", "contamination/000.png"], "verdict"]) == [
        "anomalous",
        "anomalous",
    ]
    row = ok.loc["broken_large/000.png"]
    assert row["threshold_source"] == "reference_loo" and row["threshold"] > 0
    assert (row["method"], row["backbone"], row["resolution"]) == (
        "few_shot",
        "efficientnet_lite0",
        224,
    )
    assert len(row["weights_sha256"]) == 64 and len(row["content_sha256"]) == 64
    assert (row["shots"], row["reference_version"]) == (len(REFERENCES), "v1")
    assert (row["image_height"], row["image_width"]) == (900, 900)
    assert 0 <= row["max_patch_y"] < 900 and 0 <= row["max_patch_x"] < 900
    assert row["file_size_bytes"] > 0 and row["run_id"] == first.run_id
    assert row["run_started_at"] <= row["scored_at"]


def test_maps_and_overlays(audited) -> None:
    cfg, first, _ = audited
    df = pd.read_parquet(first.report_uri).set_index("image_id")
    group = zarr.open_group(first.maps_uri, mode="r")
    for image_id in ("good/000.png", "broken_large/000.png"):
        arr = zarr.open_array(df.loc[image_id, "map_uri"], mode="r")
        assert arr.dtype == np.float16 and arr.shape == (900, 900)
        assert arr.attrs["image_id"] == image_id and arr.attrs["complete"] is True
    assert len(list(group["maps"].arrays())) == N_READABLE
    flagged = df[df["verdict"] == "anomalous"]
    assert len(flagged) == N_DEFECTIVE and flagged["overlay_uri"].notna().all()
    assert pd.isna(df.loc["good/000.png", "overlay_uri"])
    png = cv2.imread(flagged["overlay_uri"].iloc[0])
    assert png is not None and png.shape == (900, 900, 3)


def test_second_run_reuses_every_embedding_with_identical_scores(audited) -> None:
    cfg, first, second = audited
    assert (first.n_computed, first.n_reused) == (4, 0)
    assert (second.n_computed, second.n_reused) == (4 - 4, 4)
    assert second.report_uri != first.report_uri and Path(first.report_uri).exists()
    pd.testing.assert_series_equal(scores(first.report_uri), scores(second.report_uri))


def test_second_run_copies_identical_overlays_and_renders_changed_ones(
    audited, monkeypatch
) -> None:
    import tasks.overlays
    from tasks.map_archive import MapArchive

    cfg, first, second = audited
    old = pd.read_parquet(first.report_uri).set_index("image_id")
    new = pd.read_parquet(second.report_uri).set_index("image_id")
    flagged = old.index[old["verdict"] == "anomalous"]
    for image_id in flagged:  # the second run copied (or rendered) the very same JPEG
        assert (
            Path(new.loc[image_id, "overlay_uri"]).read_bytes()
            == Path(old.loc[image_id, "overlay_uri"]).read_bytes()
        )
        assert new.loc[image_id, "overlay_uri"] != old.loc[image_id, "overlay_uri"]
    # a third run renders only the overlay whose stored map no longer matches
    changed = flagged[0]
    archive = MapArchive.open(second.maps_uri, None, create=False)
    archive.put(changed, archive.get(changed).astype(np.float32) * 0.5)
    rendered = []
    real = tasks.overlays._write_overlay_or_skip

    def counting(ctx, image_id, *args, **kwargs):
        rendered.append(image_id)
        return real(ctx, image_id, *args, **kwargs)

    monkeypatch.setattr(tasks.overlays, "_write_overlay_or_skip", counting)
    third = audit_lot("bottle", "lot-1", cfg)
    assert rendered == [changed]
    assert third.n_flagged == len(flagged)
    # an older run's PNG overlay is never copied under the new JPEG name: rendered anew
    table = pq.read_table(third.report_uri)
    uris = table.column("overlay_uri").to_pylist()
    at = table.column("image_id").to_pylist().index(flagged[-1])
    png = Path(uris[at]).with_suffix(".png")
    png.write_bytes(cv2.imencode(".png", np.zeros((9, 9, 3), np.uint8))[1].tobytes())
    uris[at] = str(png)
    column = table.schema.get_field_index("overlay_uri")
    pq.write_table(table.set_column(column, "overlay_uri", pa.array(uris)), third.report_uri)
    rendered.clear()
    fourth = audit_lot("bottle", "lot-1", cfg)
    assert rendered == [flagged[-1]]
    out = pd.read_parquet(fourth.report_uri).set_index("image_id").loc[flagged[-1], "overlay_uri"]
    assert out.endswith(".jpg") and Path(out).read_bytes()[:3] == b"\xff\xd8\xff"


def test_interrupted_run_resumes(audited, tmp_path: Path, mvtec_root) -> None:
    """Half of a lot embedded by a run that then died: the next run only embeds the rest."""
    _, first, _ = audited
    root = make_root(tmp_path, mvtec_root)
    cfg = PipelineConfig.model_validate(fast_config(str(root)))
    lot = root / "incoming" / "bottle" / "lot-1"
    done = [
        SourceImage(rel, str(lot / rel), f"lots/lot-1/{rel}")
        for rel in ("broken_large/000.png", "good/000.png")
    ]
    feature_key = Path(first.embeddings_uri).name.removesuffix(".zarr")
    store_uri = cfg.layout().embeddings("bottle", feature_key)
    assert not Path(store_uri).exists()
    settings = EmbeddingStore.open(first.embeddings_uri, None).settings
    embed_images.fn(done, store_uri, settings, cfg.model, 2, 2, cfg.storage)
    resumed = audit_lot("bottle", "lot-1", cfg)
    assert (resumed.n_reused, resumed.n_computed) == (2, 2)
    pd.testing.assert_series_equal(scores(first.report_uri), scores(resumed.report_uri))


def test_dask_local_cluster_gives_exactly_the_local_scores(audited, tmp_path, mvtec_root) -> None:
    _, first, _ = audited
    root = make_root(tmp_path, mvtec_root)
    cfg = PipelineConfig.model_validate(fast_config(str(root), dask_workers=2))
    summary = with_runner(audit_lot, cfg.runtime)("bottle", "lot-1", cfg)
    assert summary.runner.startswith("dask") and summary.n_computed == N_READABLE
    local, dask = pd.read_parquet(first.report_uri), pd.read_parquet(summary.report_uri)
    cols = ["image_id", "score", "verdict", "max_patch_row", "max_patch_col", "error"]
    pd.testing.assert_frame_equal(local[cols], dask[cols])
    assert local["threshold"].iloc[0] == dask["threshold"].iloc[0]
    for image_id in ("good/000.png", "broken_large/000.png"):
        a = zarr.open_array(local.set_index("image_id").loc[image_id, "map_uri"], mode="r")[...]
        b = zarr.open_array(dask.set_index("image_id").loc[image_id, "map_uri"], mode="r")[...]
        np.testing.assert_array_equal(a, b)


def test_nightly_audits_only_lots_without_report(prefect_harness, tmp_path, mvtec_root) -> None:
    root = make_root(tmp_path, mvtec_root, lots=("lot-1", "lot-2"))
    (root / "incoming" / "bottle" / "lot-3").mkdir()  # an empty lot: a report with no rows
    cfg = PipelineConfig.model_validate(fast_config(str(root)))
    audit_lot("bottle", "lot-1", cfg)
    done = nightly_audit(cfg)
    assert sorted(s.lot for s in done) == ["lot-2", "lot-3"]
    assert [s.n_images for s in sorted(done, key=lambda s: s.lot)] == [7, 0]
    assert nightly_audit(cfg) == []  # nothing new the next night


def test_masking_decision_is_stored_reported_and_printed(audited, capsys) -> None:
    """Informed rotation (no rotated bank views), yet the masking test looked at each tested
    reference in 8 rotations; the decision and its evidence travel with the bank and every
    report, and ``anomalydino show-bank`` prints them."""
    from anomalydino_core.masking import MASKING_RULE, MaskingDecision
    from flows.cli import main
    from tasks.report import report_metadata

    cfg, first, _ = audited
    meta = report_metadata(first.report_uri)
    decision = MaskingDecision.from_dict(meta["masking"])
    refs = sorted(REFERENCES)
    assert decision.rule == MASKING_RULE and decision.mode == "auto"
    assert [v.view for v in decision.views] == [
        f"{r} rot{a:03d}" for r in refs for a in range(0, 360, 45)
    ]
    df = pd.read_parquet(first.report_uri)
    assert (df["masking"] == decision.use_mask).all()
    assert main(["show-bank", "--product", "bottle", "--root", cfg.root]) == 0
    out = capsys.readouterr().out
    assert f"masking {'on' if decision.use_mask else 'off'} (auto): {decision.reason}" in out
    assert f"rule {MASKING_RULE}; {len(decision.views)} view(s) tested" in out
    assert f"{refs[-1]} rot315" in out and "threshold " in out


def read_artifacts(keys: list[str]) -> dict[str, list]:
    """The artifacts under ``keys`` from the Prefect API, newest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)),
            sort=ArtifactSort.CREATED_DESC,
        )
    return {k: [a for a in found if a.key == k] for k in keys}


def test_page_metadata_and_prefect_artifacts(audited) -> None:
    """Each run leaves its lot page, the metadata the page uses, and three artifacts per lot
    (summary, flagged table, page link) whose history holds both runs."""
    import json

    from flows.artifacts import lot_keys
    from tasks.report import report_metadata
    from tasks.thumbnails import thumb_uri

    cfg, first, second = audited
    for s in (first, second):
        assert s.html_uri == s.report_uri.removesuffix(".parquet") + ".html"
        assert Path(s.html_uri).is_file() and s.page_seconds is not None
        assert f"lot page    {s.html_uri}" in s.text()
        meta = report_metadata(s.report_uri)
        assert meta["overlay_scale"] == [0.0, 2 * meta["threshold"]]
        refs = meta["references"]
        assert [r["image_id"] for r in refs] == list(REFERENCES)
        assert all(len(r["content_sha256"]) == 64 and Path(r["uri"]).is_file() for r in refs)
        assert set(meta["timings"]) == {"model, bank and listing", "embedding and scoring"}
        # flagged images have a thumbnail (rendered in the first run, copied in the second)
        for image_id in ("broken_large/000.png", "contamination/000.png"):
            assert Path(thumb_uri(meta["thumbs_uri"], image_id)).is_file()

    keys = lot_keys("bottle", "lot-1")
    assert keys == {k: f"lot-{k}-bottle-lot-1" for k in ("summary", "flagged", "report")}
    arts = read_artifacts(list(keys.values()))
    assert all(len(v) >= 2 for v in arts.values()), {k: len(v) for k, v in arts.items()}
    # the second run's three (other tests of this module audit the lot again)
    (summary,) = [a for a in arts[keys["summary"]] if second.run_id in a.data]
    table, link = (
        next(a for a in arts[keys[k]] if a.flow_run_id == summary.flow_run_id)
        for k in ("flagged", "report")
    )
    assert (summary.type, table.type, link.type) == ("markdown", "table", "markdown")
    assert second.html_uri in summary.data
    assert "| image | score | verdict |" in summary.data
    data = table.data if isinstance(table.data, list) else json.loads(table.data)
    rows = data if isinstance(data, list) else data["table"]
    assert [r["image_id"] for r in rows] == sorted(
        ["broken_large/000.png", "contamination/000.png"],
        key=lambda i: -scores(second.report_uri)[i],
    )
    assert all(r["score"] > r["threshold"] and r["overlay_uri"] for r in rows)
    assert Path(second.html_uri).as_uri() in link.data


def test_report_command_rebuilds_a_stored_page(audited, capsys, monkeypatch) -> None:
    from flows.cli import main

    cfg, first, _ = audited
    page = Path(first.html_uri)
    page.unlink()
    assert main(["report", first.run_id, "--root", cfg.root]) == 0
    out = capsys.readouterr().out
    assert page.is_file() and f"lot page  {page}" in out and first.run_id in page.read_text()
    before = page.stat().st_mtime_ns
    assert main(["report", str(page), "--root", cfg.root]) == 0  # the page's own path
    assert main(["report", first.report_uri, "--json"]) == 0  # the report's URI
    import webbrowser

    def no_browser():
        raise webbrowser.Error("could not locate runnable browser")

    monkeypatch.setattr(webbrowser, "get", no_browser)
    assert main(["report", first.run_id[:20], "--root", cfg.root, "--open"]) == 0  # a prefix
    assert f"no browser available here; open {page.as_uri()}" in capsys.readouterr().out
    assert page.stat().st_mtime_ns > before
    capsys.readouterr()
    assert main(["report", "20000101T000000Z-deadbeef", "--root", cfg.root]) == 2
    err = capsys.readouterr().err
    assert "error: no report of run '20000101T000000Z-deadbeef' under" in err
    assert main(["report", "../etc/passwd", "--root", cfg.root]) == 2
    assert "neither a report" in capsys.readouterr().err


def test_a_lot_audited_unmasked_scores_masked_later_as_if_masked_from_the_start(
    prefect_harness, tmp_path, mvtec_root
) -> None:
    """Masking off: the lot's embeddings are stored without masks. Turning masking on later
    reuses them, the masks computed from the stored features: the same scores as a lot
    audited with masking on from the start (masks stored when embedded)."""

    def audit(root: Path, masking: str):
        write_local(root / "references" / "bottle" / "v1", reference_files(mvtec_root))
        if not (root / "incoming" / "bottle" / "lot-1").exists():
            write_local(root / "incoming" / "bottle" / "lot-1", lot_files(mvtec_root))
        overrides = fast_config(str(root))
        overrides["products"]["bottle"]["masking"] = masking
        summary = audit_lot("bottle", "lot-1", PipelineConfig.model_validate(overrides))
        return summary, pd.read_parquet(summary.report_uri).set_index("image_id")

    unmasked, off = audit(tmp_path / "later", "off")
    store = EmbeddingStore.open(unmasked.embeddings_uri, None)
    lot_ids = [i for i in store.ids() if i.startswith("lots/")]
    assert len(lot_ids) == N_READABLE
    assert all(store.get(i).mask is None for i in lot_ids)
    assert not off["masking"].any()
    masked_later, later = audit(tmp_path / "later", "on")
    masked_early, early = audit(tmp_path / "early", "on")
    first = EmbeddingStore.open(masked_early.embeddings_uri, None)
    assert all(first.get(i).mask is not None for i in lot_ids)
    assert later["masking"].all() and early["masking"].all()
    assert masked_later.n_reused == N_READABLE  # nothing embedded again
    ok = later["error"].isna()
    pd.testing.assert_series_equal(later.loc[ok, "score"], early.loc[ok, "score"])
    pd.testing.assert_series_equal(
        later.loc[ok, "masked_fraction"], early.loc[ok, "masked_fraction"]
    )
    assert (later.loc[ok, "masked_fraction"] > 0).any()  # the masks did mask something
