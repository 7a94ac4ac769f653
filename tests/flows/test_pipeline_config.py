"""Pipeline configuration and storage layout (no Prefect, no model)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from anomalydino_core.config import ScoringSettings
from flows.config import PipelineConfig
from tasks.bank import bank_key
from tasks.layout import Layout, check_name, latest_version, natural_key, overlay_name


def test_defaults_and_layout(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = PipelineConfig.load(environ={})
    assert cfg.root == str(tmp_path / ".data" / "pipeline")  # relative local roots become absolute
    lay = cfg.layout()
    assert lay.lot("bottle", "lot-1") == f"{cfg.root}/incoming/bottle/lot-1"
    assert lay.reference_version("bottle", "v2") == f"{cfg.root}/references/bottle/v2"
    assert lay.report("bottle", "lot-1", "R") == f"{cfg.root}/reports/bottle/lot-1/R.parquet"
    assert lay.map_archive("bottle", "lot-1", "R").endswith("maps/bottle/lot-1/R/anomaly_maps.zarr")
    s3 = Layout.at("s3://bucket/p", incoming="s3://raw/in")
    assert s3.lot("bottle", "L") == "s3://raw/in/bottle/L"
    assert s3.embeddings("bottle", "k") == "s3://bucket/p/embeddings/bottle/k.zarr"
    assert overlay_name("a/b.png") == "a/b.png.jpg" and overlay_name("a/b") == "a/b.jpg"


def test_file_env_and_overrides_precedence(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        "root: s3://from-file/root\n"
        "model: {backbone: efficientnet_lite0, resolution: 224}\n"
        "products:\n  bottle: {masking: 'off', rotation: informed, shots: 4, threshold: 0.3}\n"
    )
    env = {"ANOMALYDINO_CONFIG": str(path), "ANOMALYDINO_ROOT": "s3://from-env/root"}
    cfg = PipelineConfig.load(environ=env, overrides={"model": {"resolution": 448}})
    assert cfg.root == "s3://from-env/root"
    assert (cfg.model.backbone, cfg.model.resolution) == ("efficientnet_lite0", 448)
    scoring = cfg.scoring_for("bottle")
    assert (scoring.masking, scoring.rotation) == ("off", "informed")
    assert cfg.scoring_for("other") == ScoringSettings()
    assert cfg.product("bottle").shots == 4
    # JSON round trip (what a flow parameter / deployment carries) keeps everything
    assert PipelineConfig.model_validate_json(cfg.model_dump_json()) == cfg


def test_bad_config_names_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="resolutoin"):
        PipelineConfig.model_validate({"model": {"resolutoin": 448}})
    with pytest.raises(ValidationError, match="unknown backbone"):
        PipelineConfig.model_validate({"model": {"backbone": "resnet9000"}})
    with pytest.raises(ValidationError, match="product name"):
        PipelineConfig.model_validate({"products": {"bad name": {}}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("root: [unclosed\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        PipelineConfig.load(bad, environ={})
    with pytest.raises(ValueError, match="lot name '../x'"):
        Layout.at("/r").lot("bottle", "../x")


def test_storage_settings_never_hold_secrets() -> None:
    fields = set(PipelineConfig.model_fields["storage"].annotation.model_fields)
    assert not fields & {"key", "secret", "secret_key", "password"}
    cfg = PipelineConfig.model_validate({"storage": {"endpoint_url": "http://127.0.0.1:1"}})
    sc = cfg.storage.storage_config()
    assert sc.endpoint_url == "http://127.0.0.1:1"


def test_names_and_versions() -> None:
    assert check_name("lot", "2024-05-01_A") == "2024-05-01_A"
    for bad in ("", "a/b", ".hidden", "a b", "x" * 200):
        with pytest.raises(ValueError):
            check_name("lot", bad)
    assert latest_version(["v2", "v10", "v9"]) == "v10"
    assert latest_version(["2024-05-01", "2024-12-01"]) == "2024-12-01"
    assert latest_version([]) is None
    assert sorted(["v10", "v2"], key=natural_key) == ["v2", "v10"]


def test_bank_key_tracks_what_shapes_the_bank() -> None:
    rule = {"loo_sigmas": 3.0, "loo_margin": 0.0, "loo_max_references": 16}
    base = bank_key("feat", ScoringSettings(), None, rule)
    assert base.startswith("feat--")
    assert bank_key("feat", ScoringSettings(), None, rule) == base
    assert bank_key("feat", ScoringSettings(rotation="informed"), None, rule) != base
    assert bank_key("feat", ScoringSettings(), 4, rule) != base
    assert bank_key("feat", ScoringSettings(), None, {**rule, "loo_sigmas": 2.0}) != base
    assert bank_key("other", ScoringSettings(), None, rule) != base
