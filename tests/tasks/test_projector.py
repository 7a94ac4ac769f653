"""Stored projectors: the manifest round-trips, a projector made for another backbone, layer or
settings is refused with every difference named, and weights with other bytes are refused."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest

from anomalydino_core.foundad.config import FoundADConfig
from anomalydino_core.foundad.projector import ManifoldProjector
from anomalydino_core.foundad.trained import projector_bytes
from anomalydino_core.foundad.training import TrainingConfig
from tasks import projector as store
from tasks.projector import (
    ProjectorError,
    ProjectorManifest,
    ProjectorMismatchError,
    check_identity,
    load_projector,
    projector_key,
    read_projector_manifest,
)

CONFIG = FoundADConfig(training=TrainingConfig(width=32, depth=1, num_heads=2))
IDENTITY = json.loads(
    json.dumps(
        {
            "token_key": "efficientnet_lite0-224-fp32-abc",
            "backbone": "efficientnet_lite0",
            "weights_sha256": "0" * 64,
            "layer": "EfficientNetLite0Patches: its FoundAD layer, 16 channels",
            "config": CONFIG.to_dict(),
        }
    )
)


def stored(tmp_path: Path) -> ProjectorManifest:
    projector = ManifoldProjector(CONFIG.training.projector_config(16))
    data = projector_bytes(projector)
    uri = str(tmp_path / "foundad" / projector_key(IDENTITY["token_key"], CONFIG))
    manifest = ProjectorManifest(
        uri=uri, product="p", version="v1", bank_key="b", key=uri.rsplit("/", 1)[1],
        embed_dim=16, references=[], cutpaste_on_foreground=False, history=[], best_epoch=0,
        stopped_by="max_epochs", precision="fp32", train_seconds=1.0,
        held_out_normal_scores=[0.1], held_out_anomaly_scores=[0.2], derived_threshold=None,
        threshold_reason="", projector_sha256=hashlib.sha256(data).hexdigest(),
        n_parameters=1, **IDENTITY,
    )  # fmt: skip
    Path(uri).mkdir(parents=True)
    Path(manifest.weights_uri).write_bytes(data)
    (Path(uri) / "projector.json").write_text(manifest.to_json())
    return manifest


def test_manifest_round_trips_and_matches_its_identity(tmp_path) -> None:
    manifest = stored(tmp_path)
    again = read_projector_manifest(manifest.uri, None)
    assert again == manifest
    check_identity(again, IDENTITY)
    assert load_projector(again, None).config.embed_dim == 16
    assert read_projector_manifest(str(tmp_path / "nothing"), None) is None


def test_other_backbone_layer_or_settings_are_refused_naming_each_difference(tmp_path) -> None:
    manifest = stored(tmp_path)
    other = json.loads(
        json.dumps(replace(CONFIG, training=replace(CONFIG.training, seed=3)).to_dict())
    )
    wanted = dict(IDENTITY, backbone="dinov2_vits14", layer="blocks[3]", config=other)
    with pytest.raises(ProjectorMismatchError) as err:
        check_identity(manifest, wanted)
    text = str(err.value)
    assert "backbone: stored 'efficientnet_lite0', asked 'dinov2_vits14'" in text
    assert "layer: stored" in text and "training.seed stored 0, asked 3" in text
    assert "token_key" not in text and "weights_sha256" not in text


def test_weights_with_other_bytes_or_a_foreign_manifest_are_refused(tmp_path) -> None:
    manifest = stored(tmp_path)
    data = Path(manifest.weights_uri).read_bytes()
    Path(manifest.weights_uri).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    store._load.cache_clear()
    with pytest.raises(ProjectorError, match="content sha256 .* differs"):
        load_projector(manifest, None)
    (Path(manifest.uri) / "projector.json").write_text(json.dumps({"format": "something/1"}))
    with pytest.raises(ProjectorError, match="not a projector manifest"):
        read_projector_manifest(manifest.uri, None)
