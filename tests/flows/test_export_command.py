"""``anomalydino export``: writes a model that loads and matches fp32 torch; bad input exits 2."""

from __future__ import annotations

import json

import numpy as np
import torch

from anomalydino_core.features import to_input_tensor
from anomalydino_core.runtimes import patch_cosines
from flows.cli import main
from tasks.exports import ExportKey, damage, open_export
from tasks.weights import load_backbone


def test_export_writes_a_model_that_loads_and_matches_torch(tmp_path, capsys):
    args = ["export", "--backbone", "efficientnet_lite0", "--format", "openvino"]
    args += ["--resolution", "224", "--image-size", "300x400", "--output", str(tmp_path), "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["written"] and result["check_passed"] and result["input_hw"] == [224, 288]
    folder = tmp_path / "openvino" / result["folder"].rsplit("/", 1)[-1]
    assert (folder / "model.xml").is_file() and (folder / "manifest.json").is_file()

    backbone = load_backbone("efficientnet_lite0")
    image = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    x = to_input_tensor(image, backbone.preprocess(224))[None]
    got = open_export(folder, "openvino", precision="fp32", threads=2)(x)
    with torch.inference_mode():
        ref = backbone.module(x).numpy()
    assert got.shape == ref.shape == (1, 14, 18, 152)
    assert patch_cosines(got, ref).min() >= 0.999
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["key"]["weights_sha256"] == backbone.identity.weights_sha256
    assert main(args) == 0  # a second export finds the first one
    assert not json.loads(capsys.readouterr().out)["written"]
    assert (
        damage(
            folder,
            ExportKey.of(backbone, "openvino", (224, 288)),
        )
        is None
    )


def test_bad_export_input_is_named_and_exits_2(tmp_path, capsys):
    args = ["export", "--backbone", "efficientnet_lite0", "--format", "onnx"]
    assert main([*args, "--image-size", "900by1200", "--output", str(tmp_path)]) == 2
    assert "--image-size '900by1200'" in capsys.readouterr().err
    assert main([*args, "--resolution", "100", "--output", str(tmp_path)]) == 2
    assert "multiple of 32" in capsys.readouterr().err
    assert main([*args, "--precision", "int8", "--output", str(tmp_path)]) == 2
    assert "no onnx export stores int8 weights" in capsys.readouterr().err
