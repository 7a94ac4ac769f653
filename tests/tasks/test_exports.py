"""OpenVINO's int8-weight exports (``model.precision=int8``): their own cache key, int8 weights
in the IR, features within the export check of fp32 torch, the runtime rules around them.

Real exports (nncf's weight compression, OpenVINO) into a temporary cache: no mocks. Speed is
bench/embed.py's business.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from anomalydino_core.backbones import build_backbone
from anomalydino_core.config import FoundADSettings, ModelSettings, ScoringSettings
from anomalydino_core.features import PatchFeatureExtractor
from anomalydino_core.runtimes import OpenVinoRunner, PerShapeRunner, patch_cosines
from tasks.exports import ExportKey, _write_export, ensure_export
from tasks.models import build_extractor, feature_key, feature_settings
from tasks.runtimes import attach_runtime
from tasks.weights import load_backbone

RES = 224
IMAGES = [np.random.default_rng(2).integers(0, 255, (RES, 260, 3), dtype=np.uint8)]


@pytest.fixture(scope="module", autouse=True)
def cache(module_cache: Path) -> Path:
    return module_cache


@pytest.fixture(scope="module")
def vit():
    """ViT-S/14 with random weights and its LayerScale gammas at 1: random init leaves them at
    1e-5, which silences every block, and int8 weights would then change nothing measurable."""
    backbone = load_backbone("dinov2_vits14", weights="random")
    with torch.no_grad():
        for name, parameter in backbone.module.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma")):
                parameter.fill_(1.0)
    identity = dataclasses.replace(backbone.identity, weights_sha256="random:layerscale-1")
    return dataclasses.replace(backbone, identity=identity)


def _weight_types(folder: Path) -> set[str]:
    """Element types of the IR's constants that feed a matrix product, directly or unpacked."""
    import openvino as ov

    model = ov.Core().read_model(str(folder / "model.xml"))
    return {
        op.get_output_element_type(0).get_type_name()
        for op in model.get_ops()
        if op.get_type_name() == "Constant"
        and op.get_output_partial_shape(0).rank.get_length() == 2
    }


def test_int8_weights_are_their_own_export_and_match_fp32_torch(vit, cache):
    int8_key = ExportKey.of(vit, "openvino", (RES, RES), "int8")
    fp32_key = ExportKey.of(vit, "openvino", (RES, RES))
    assert int8_key.digest() != fp32_key.digest() and "nncf" in dict(int8_key.versions)
    with pytest.raises(ValueError, match="no onnx export stores int8"):
        ExportKey.of(vit, "onnx", (RES, RES), "int8")

    reference = build_extractor(
        ModelSettings(backbone=vit.identity.name, resolution=RES, precision="fp32",
                      runtime="torch"), vit,
    ).embed(IMAGES)  # fmt: skip
    model = ModelSettings(
        backbone=vit.identity.name, resolution=RES, threads=2, batch_size=2, precision="int8"
    )
    ex = build_extractor(model, vit)  # runtime auto: OpenVINO is the only candidate
    assert ex.precision == "int8" and ex.runtime == "openvino"
    grids = ex.embed(IMAGES)
    assert isinstance(ex.runner, PerShapeRunner) and not ex.runner.fallback_reasons
    assert all(isinstance(r, OpenVinoRunner) for r in ex.runner.runners.values())
    for got, ref in zip(grids, reference, strict=True):
        assert got.shape == ref.shape and got.dtype == np.float32
        cosines = patch_cosines(got, ref)
        assert cosines.min() >= 0.999 and cosines.min() < 1.0 - 1e-7  # close, not the same
    # its request modes were measured once (2 images, 2 threads) and cached
    assert len(list((cache / "runtimes").glob("dinov2_vits14-224-*.json"))) == 1

    int8_folder, written = ensure_export(vit, "openvino", (RES, 266), cache / "exports", "int8")
    assert not written  # the embed above exported it
    fp32_folder, _ = ensure_export(vit, "openvino", (RES, 266), cache / "exports")
    assert "i8" in _weight_types(int8_folder) and "i8" not in _weight_types(fp32_folder)
    # stored embeddings of int8 weights never mix with fp32 ones
    assert "int8" in feature_key(feature_settings(ex))


def test_int8_leaves_convolutions_fp32_so_a_cnn_runs_its_openvino_export(cache):
    lite0 = load_backbone("efficientnet_lite0")
    model = ModelSettings(backbone="efficientnet_lite0", resolution=RES, precision="int8")
    image = [np.random.default_rng(3).integers(0, 255, (RES, 288, 3), dtype=np.uint8)]
    ex = build_extractor(model, lite0)
    got = ex.embed(image)[0]
    assert ex.runtime == "openvino" and not ex.runner.fallback_reasons  # its check passed
    reference = build_extractor(model.model_copy(update={"precision": "fp32"}), lite0)
    assert patch_cosines(got, reference.embed(image)[0]).min() >= 0.99999
    folder, written = ensure_export(lite0, "openvino", (RES, 288), cache / "exports", "int8")
    assert not written and "i8" not in _weight_types(folder)  # no linear layer to compress


def test_an_int8_export_failing_its_check_leaves_the_model_to_fp32_torch(tmp_path):
    backbone = build_backbone("dinov2_vits14", seed=0)  # random weights, own identity
    wrong = build_backbone("dinov2_vits14", seed=1)  # what a broken exporter might write
    key = ExportKey.of(backbone, "openvino", (RES, RES), "int8")
    folder = key.folder(tmp_path / "exports")
    folder.mkdir(parents=True)
    _write_export(wrong, key, folder)  # complete, a valid manifest, the wrong features
    ex = PatchFeatureExtractor(backbone, resolution=RES, precision="int8", batch_size=2)
    fp32 = PatchFeatureExtractor(backbone, resolution=RES, precision="fp32").embed(IMAGES)[0]
    decision = attach_runtime(ex, "auto", threads=2, root=tmp_path)  # OpenVINO's modes measured
    assert decision.runtime == "torch" and "FAILED" in decision.calibration.rejected["openvino"]
    np.testing.assert_array_equal(ex.embed(IMAGES)[0], fp32)  # torch ran it, in fp32


def test_int8_is_refused_for_runtimes_that_cannot_run_it():
    for runtime in ("torch", "vit_cpu", "onnx"):
        with pytest.raises(ValidationError, match="int8 runs through OpenVINO only"):
            ModelSettings(runtime=runtime, precision="int8")


def test_foundad_runs_its_torch_passes_in_fp32_beside_int8_weights():
    config = FoundADSettings().config(ModelSettings(precision="int8"), ScoringSettings(), seed=0)
    assert config.training.precision == "fp32" and config.scoring.precision == "fp32"
