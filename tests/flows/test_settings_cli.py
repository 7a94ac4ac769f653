"""The command-line flags and the settings table come from the one settings model."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from flows.cli import build_parser
from flows.config import PipelineConfig
from flows.settings_cli import (
    PIPELINE_SECTIONS,
    add_settings_flags,
    flag_name,
    load_settings,
    section_model,
    settings_table,
)

REPO = Path(__file__).resolve().parents[2]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_settings_flags(parser)
    return parser


def test_every_scalar_setting_has_a_flag_with_the_models_choices() -> None:
    flags = {a.dest: a for a in _parser()._actions}
    for section in PIPELINE_SECTIONS:
        for name, field in section_model(section).model_fields.items():
            if name == "client_kwargs":  # a mapping: config file only
                continue
            action = flags[f"{section}.{name}"]
            assert action.option_strings[0] == flag_name(f"{section}.{name}")
            if action.choices is not None:
                assert tuple(action.choices) == tuple(field.annotation.__args__)


def test_flags_override_the_file_and_only_when_given(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model: {resolution: 224, batch_size: 2}\nscoring: {index: hnsw}\n")
    args = _parser().parse_args(
        ["--config", str(path), "--resolution", "336", "--mask-references", "--chunk-size", "3"]
    )
    cfg = load_settings(args)
    assert (cfg.model.resolution, cfg.model.batch_size) == (336, 2)  # flag > file, file kept
    assert cfg.scoring.index == "hnsw" and cfg.scoring.mask_references is True
    assert cfg.runtime.chunk_size == 3
    assert load_settings(_parser().parse_args([])) == PipelineConfig.load()


def test_bad_flag_values_are_refused_by_the_model() -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["--image-score", "mean"])
    args = _parser().parse_args(["--resolution", "-3"])
    with pytest.raises(ValueError, match="resolution"):
        load_settings(args)


def test_audit_takes_scoring_flags_and_evaluate_takes_config(tmp_path: Path) -> None:
    parser = build_parser()
    audit = parser.parse_args(
        ["audit", "--product", "p", "--lot", "l", "--image-score", "max", "--masking", "off"]
    )
    cfg = load_settings(audit)
    assert (cfg.scoring.image_score, cfg.scoring.masking) == ("max", "off")
    path = tmp_path / "e.yaml"
    path.write_text("model: {backbone: efficientnet_lite0}\nscoring: {sigma: 2.0}\n")
    ev = parser.parse_args(
        ["evaluate", "--data", "d", "--category", "c", "--config", str(path), "--sigma", "3"]
    )
    cfg = load_settings(ev)
    assert (cfg.model.backbone, cfg.scoring.sigma) == ("efficientnet_lite0", 3.0)
    with pytest.raises(SystemExit):  # evaluate's rotation comes from --preprocess
        parser.parse_args(["evaluate", "--data", "d", "--category", "c", "--rotation", "informed"])


def test_every_command_prints_its_help() -> None:
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"audit", "evaluate", "config", "demo", "screen"} <= set(commands)
    for name, sub in commands.items():
        text = sub.format_help()
        assert "--config" in text, name
        if name not in ("evaluate", "export"):  # export: the model settings only
            assert "--image-score" in text and "--chunk-size" in text, name
    export_help = commands["export"].format_help()
    assert "--backbone" in export_help and "--runtime" not in export_help


def test_docs_table_is_generated_from_the_model() -> None:
    docs = (REPO / "docs" / "settings.md").read_text()
    assert docs.endswith(settings_table()), "regenerate: anomalydino config --table"
    assert "`model.resolution` | `--resolution` | `448`" in docs
