"""Runtimes through the I/O layer: every runtime against fp32 torch on both backbones, the
calibration cache, forced runtimes, the export cache's hash check and the failed-check fallback.

Real exports (OpenVINO, ONNX Runtime) into one temporary cache per module: no mocks. Nothing
here asserts a speed; which runtime is faster is the benches' business (bench/embed.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from anomalydino_core.backbones import build_backbone
from anomalydino_core.config import ModelSettings
from anomalydino_core.runtimes import OnnxRunner, OpenVinoRunner, PerShapeRunner, patch_cosines
from tasks.exports import ExportKey, _write_export, damage, ensure_export, open_export
from tasks.machine import cache_root, cpu_identity
from tasks.models import build_extractor
from tasks.runtimes import attach_runtime, read_calibration
from tasks.weights import load_backbone

RES = 224
#: a square and a landscape image: two input sizes, two exports per exported runtime
IMAGES = [
    np.random.default_rng(0).integers(0, 255, (RES, RES, 3), dtype=np.uint8),
    np.random.default_rng(1).integers(0, 255, (RES, 300, 3), dtype=np.uint8),
]


@pytest.fixture(scope="module", autouse=True)
def cache(module_cache: Path) -> Path:
    return module_cache


@pytest.fixture(scope="module")
def backbones():
    return {
        "dinov2_vits14": load_backbone("dinov2_vits14", weights="random"),
        "efficientnet_lite0": load_backbone("efficientnet_lite0"),
    }


def _settings(name: str, **kw) -> ModelSettings:
    return ModelSettings(backbone=name, resolution=RES, threads=2, batch_size=2, **kw)


def _fp32_torch(backbone) -> list[np.ndarray]:
    model = _settings(backbone.identity.name, precision="fp32", runtime="torch")
    return build_extractor(model, backbone).embed(IMAGES)


@pytest.mark.parametrize(
    ("name", "runtime", "precision"),
    [
        ("dinov2_vits14", "torch", "bf16"),
        ("dinov2_vits14", "vit_cpu", "bf16"),
        ("dinov2_vits14", "openvino", "bf16"),
        ("dinov2_vits14", "onnx", "auto"),  # fp32: ONNX Runtime has no bf16 CPU kernels
        ("efficientnet_lite0", "torch", "fp32"),
        ("efficientnet_lite0", "openvino", "fp32"),
        ("efficientnet_lite0", "onnx", "fp32"),
    ],
)
def test_each_runtime_gives_the_fp32_torch_grids(backbones, name, runtime, precision):
    backbone = backbones[name]
    reference = _fp32_torch(backbone)
    ex = build_extractor(_settings(name, runtime=runtime, precision=precision), backbone)
    assert ex.runtime == runtime  # forced: honoured
    grids = ex.embed(IMAGES)
    for got, ref in zip(grids, reference, strict=True):
        assert got.shape == ref.shape and got.dtype == np.float32
        assert patch_cosines(got, ref).min() >= 0.999
    if runtime in ("openvino", "onnx"):
        assert isinstance(ex.runner, PerShapeRunner) and not ex.runner.fallback_reasons
        kind = OpenVinoRunner if runtime == "openvino" else OnnxRunner
        assert len(ex.runner.runners) == 2  # one export per input size
        assert all(isinstance(r, kind) for r in ex.runner.runners.values())
    if runtime == "onnx":
        assert ex.precision == "fp32"


def test_impossible_forced_runtimes_are_refused_with_the_reason(backbones):
    with pytest.raises(ValueError, match="vit_cpu runs plain DINOv2"):
        build_extractor(
            _settings("efficientnet_lite0", runtime="vit_cpu"), backbones["efficientnet_lite0"]
        )
    with pytest.raises(ValueError, match="bf16 path"):
        build_extractor(
            _settings("dinov2_vits14", runtime="vit_cpu", precision="fp32"),
            backbones["dinov2_vits14"],
        )
    with pytest.raises(ValidationError, match="fp32 only"):
        ModelSettings(runtime="onnx", precision="bf16")


def test_calibration_picks_its_fastest_caches_the_figures_and_measures_a_new_key_again(
    backbones, cache
):
    backbone = backbones["efficientnet_lite0"]  # fp32: torch, openvino and onnx compete
    model = _settings("efficientnet_lite0", runtime="torch")
    first = attach_runtime(build_extractor(model, backbone), "auto", threads=2, rounds=2)
    assert first.measured_now and first.cache_file is not None and first.cache_file.is_file()
    figures = first.calibration.figures
    assert {f.runtime for f in figures} == {"torch", "openvino", "onnx"}
    assert first.runtime == figures[0].runtime  # the lowest median wins
    assert [f.median_ms for f in figures] == sorted(f.median_ms for f in figures)
    stored = json.loads(first.cache_file.read_text())
    assert stored["choice"] == first.runtime and stored["key"]["cpu"] == cpu_identity()
    assert len(stored["figures"]) == 3 and stored["figures"][0]["rounds"] == 2
    assert first.cache_file.parent == cache_root() / "runtimes"

    ex = build_extractor(model, backbone)
    again = attach_runtime(ex, "auto", threads=2)
    assert not again.measured_now and again.runtime == first.runtime == ex.runtime
    assert json.loads(first.cache_file.read_text()) == stored  # not measured, not rewritten
    assert patch_cosines(ex.embed(IMAGES[:1])[0], _fp32_torch(backbone)[0]).min() >= 0.999

    other = attach_runtime(
        build_extractor(model.model_copy(update={"resolution": 256}), backbone),
        "auto",
        threads=2,
        rounds=1,
    )
    assert other.measured_now and other.cache_file != first.cache_file
    assert read_calibration(first.cache_file, stored["key"]) is not None  # the first one stays


def test_a_corrupted_cached_export_is_detected_and_rebuilt(backbones, cache):
    backbone = backbones["efficientnet_lite0"]
    folder, _ = ensure_export(backbone, "openvino", (RES, RES), cache / "exports")
    key = ExportKey.of(backbone, "openvino", (RES, RES))
    assert damage(folder, key) is None
    weights = folder / "model.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert "sha256" in damage(folder, key)
    again, written = ensure_export(backbone, "openvino", (RES, RES), cache / "exports")
    assert again == folder and written and damage(folder, key) is None
    runner = open_export(folder, "openvino", precision="fp32", threads=2)
    reference = _fp32_torch(backbone)[0]
    x = build_extractor(_settings("efficientnet_lite0", runtime="torch"), backbone)
    from anomalydino_core.features import to_input_tensor

    got = runner(to_input_tensor(IMAGES[0], x.preprocess)[None])[0]
    assert patch_cosines(got, reference).min() >= 0.999


def test_an_export_that_fails_its_check_leaves_the_size_to_torch_with_the_reason(tmp_path):
    backbone = build_backbone("efficientnet_lite0", seed=0)  # random weights, own identity
    wrong = build_backbone("efficientnet_lite0", seed=1)  # what a broken exporter might write
    key = ExportKey.of(backbone, "onnx", (RES, RES))
    folder = key.folder(tmp_path / "exports")
    folder.mkdir(parents=True)
    _write_export(wrong, key, folder)  # a complete export with a valid manifest, wrong features
    assert damage(folder, key) is None
    model = _settings("efficientnet_lite0", runtime="torch")
    ex = build_extractor(model, backbone)
    torch_grid = ex.embed(IMAGES[:1])[0]
    attach_runtime(ex, "onnx", threads=2, root=tmp_path)
    grid = ex.embed(IMAGES[:1])[0]
    reasons = ex.runner.fallback_reasons
    assert list(reasons) == [(RES, RES)] and "FAILED" in reasons[(RES, RES)]
    np.testing.assert_array_equal(grid, torch_grid)  # torch ran it


def test_an_export_check_is_kept_beside_the_export_and_decides_in_later_processes(backbones, cache):
    backbone = backbones["efficientnet_lite0"]
    model = _settings("efficientnet_lite0", runtime="torch")

    def attached():
        ex = build_extractor(model, backbone)
        attach_runtime(ex, "openvino", threads=2, root=cache)
        return ex, ex.embed(IMAGES[:1])[0]

    ex, _ = attached()
    assert not ex.runner.fallback_reasons
    folder = ExportKey.of(backbone, "openvino", (RES, RES)).folder(cache / "exports")
    [kept] = list((folder / "checks").glob("*.json"))
    stored = json.loads(kept.read_text())
    assert stored["passed"] and stored["min_patch_cosine"] >= 0.999
    assert damage(folder, ExportKey.of(backbone, "openvino", (RES, RES))) is None
    kept.write_text(json.dumps({**stored, "passed": False}))  # as if it had failed here
    ex, grid = attached()
    assert "FAILED" in ex.runner.fallback_reasons[(RES, RES)]  # the kept outcome decided
    np.testing.assert_array_equal(grid, build_extractor(model, backbone).embed(IMAGES[:1])[0])
    kept.unlink()  # no kept check: checked again, and kept again
    ex, _ = attached()
    assert not ex.runner.fallback_reasons and json.loads(kept.read_text())["passed"]


def test_openvino_chosen_measures_its_request_modes_and_later_processes_keep_them(
    backbones, cache, monkeypatch
):
    """The calibration that picks OpenVINO also measures one image per request against the
    whole batch per request and against one image per stream, beside the preprocessing; the
    choice follows the margin rule, is cached, and later processes apply it."""
    import threading

    import tasks.runtimes as runtimes_module
    from anomalydino_core.runtimes import REQUEST_MARGIN, candidates, has_vit_cpu_blocks
    from tasks.runtimes import (
        build_runner,
        calibrate,
        calibration_file,
        calibration_key,
        installed_runtimes,
        write_calibration,
    )

    backbone = backbones["dinov2_vits14"]
    model = _settings("dinov2_vits14", runtime="torch", precision="bf16")
    ex = build_extractor(model, backbone)
    beside_threads: list[str] = []
    real_work = runtimes_module.preprocessing_work

    def counted(extractor):
        work = real_work(extractor)
        return lambda: (beside_threads.append(threading.current_thread().name), work())

    monkeypatch.setattr(runtimes_module, "preprocessing_work", counted)
    calibration, runners = calibrate(ex, ["openvino"], 2, cache, rounds=2)
    assert beside_threads and set(beside_threads) == {"calibration-beside"}  # it ran beside
    figures = {f.runtime: f.median_ms for f in calibration.request_figures}
    assert calibration.choice == "openvino" and set(figures) == {"1", "2", "2 streams"}
    wanted = next(
        mode
        for mode in sorted(figures, key=figures.__getitem__)
        if mode == "1" or figures[mode] <= REQUEST_MARGIN * figures["1"]
    )
    streams = 2 if wanted == "2 streams" else 1
    images = 1 if streams > 1 else int(wanted)
    assert (calibration.request_images, calibration.streams) == (images, streams)
    runner = runners["openvino"]
    compiled = runner.runner_for((RES, RES))
    assert (compiled.request_images, compiled.streams) == (images, streams)
    assert ("streams" in calibration.text()) == (streams > 1)

    # every mode gives the same grids (within the export check's tolerance)
    grids = ex.embed(IMAGES[:1] * 2)
    one_stream = build_runner(ex, "openvino", 2, cache)
    for mode in ("1", "2", "2 streams"):
        other = runners["openvino/2 streams"] if mode == "2 streams" else one_stream
        if mode != "2 streams":
            other.set_request_images(int(mode))
        ex.use_runner(other)
        for got, ref in zip(ex.embed(IMAGES[:1] * 2), grids, strict=True):
            assert patch_cosines(got, ref).min() >= 0.999

    # a later process reads the choice (forced here) and applies it to every input size
    names, _ = candidates(
        device_type="cpu",
        precision=ex.precision,
        has_vit_cpu=has_vit_cpu_blocks(ex.module),
        installed=installed_runtimes(),
    )
    key = calibration_key(ex, 2, names)
    assert key["openvino_variants"] == ["openvino", "openvino/2", "openvino/2 streams"]
    for forced_mode in ({"request_images": 2, "streams": 1}, {"request_images": 1, "streams": 2}):
        forced = calibration.__class__.from_dict({**calibration.to_dict(), **forced_mode})
        write_calibration(calibration_file(key, cache), key, forced)
        later = build_extractor(model, backbone)
        decision = attach_runtime(later, "auto", threads=2, root=cache)
        assert decision.runtime == "openvino" and not decision.measured_now
        later.embed(IMAGES)  # two input sizes: both runners get the cached mode
        assert len(later.runner.runners) == 2
        modes = {(r.request_images, r.streams) for r in later.runner.runners.values()}
        if forced_mode["streams"] > 1:  # the request size does not apply to streams
            assert {m[1] for m in modes} == {2}
        else:
            assert modes == {(2, 1)}


def test_openvino_in_streams_runs_each_image_in_batch_order(backbones, cache):
    """Two streams run a batch of three one image per request: each output is its own image's
    (the same features as one stream) in batch order, and a failed request leaves none running."""
    from anomalydino_core.runtimes import probe_batch

    folder, _ = ensure_export(backbones["dinov2_vits14"], "openvino", (RES, RES), cache / "exports")
    batch = probe_batch((RES, RES), batch=3)
    one = open_export(folder, "openvino", precision="bf16", threads=2)(batch)
    streamed = open_export(folder, "openvino", precision="bf16", threads=2, streams=2)
    assert streamed.streams == 2 and len(streamed.requests) == 2
    got = streamed(batch)
    assert got.shape == one.shape
    for i in range(3):
        assert patch_cosines(got[i], one[i]).min() >= 0.9999
        assert patch_cosines(got[i], one[(i + 1) % 3]).min() < 0.9  # not another image's
    with pytest.raises(Exception):  # noqa: B017 (OpenVINO's own error type)
        streamed(probe_batch((RES + 14, RES), batch=2))  # the export's size is fixed
    np.testing.assert_array_equal(streamed(batch), got)  # no request left running


def test_openvino_compiled_model_is_cached_per_machine_and_gives_the_same_features(
    backbones, cache
):
    from anomalydino_core.runtimes import probe_batch

    folder, _ = ensure_export(backbones["dinov2_vits14"], "openvino", (RES, RES), cache / "exports")
    batch = probe_batch((RES, RES), batch=2)
    before = sorted(folder.rglob("*"))
    plain = open_export(folder, "openvino", precision="bf16", threads=2)(batch)
    assert sorted(folder.rglob("*")) == before  # no machine named: no cache written
    first = open_export(folder, "openvino", precision="bf16", threads=2, machine="cpu-a")
    blobs = sorted(p.name for p in (folder / "compiled" / "cpu-a").iterdir())
    assert blobs  # the compiled model, kept for this machine
    again = open_export(folder, "openvino", precision="bf16", threads=2, machine="cpu-a")
    assert sorted(p.name for p in (folder / "compiled" / "cpu-a").iterdir()) == blobs
    assert not list(folder.glob(".compiling-*"))  # the private folders are gone
    np.testing.assert_array_equal(first(batch), plain)
    np.testing.assert_array_equal(again(batch), plain)  # imported: the same to the bit


def test_openvino_compiles_without_its_cache_where_the_cache_cannot_be_kept(
    backbones, cache, tmp_path
):
    import shutil

    from anomalydino_core.runtimes import probe_batch

    folder, _ = ensure_export(backbones["dinov2_vits14"], "openvino", (RES, RES), cache / "exports")
    copy = tmp_path / "export"
    copy.mkdir()
    for name in ("model.xml", "model.bin"):
        shutil.copy(folder / name, copy / name)
    (copy / "compiled").write_text("not a folder")  # the cache's place is taken
    batch = probe_batch((RES, RES), batch=2)
    runner = open_export(copy, "openvino", precision="bf16", threads=2, machine="cpu-a")
    plain = open_export(copy, "openvino", precision="bf16", threads=2)
    np.testing.assert_array_equal(runner(batch), plain(batch))
    assert sorted(p.name for p in copy.iterdir()) == ["compiled", "model.bin", "model.xml"]


def test_openvino_exports_of_a_vit_hold_its_tokens_padded(backbones, cache):
    """The OpenVINO export carries the key mask of tokens padded to a multiple of 32 (and says
    so in its key); ONNX exports are not padded."""
    import openvino as ov

    from anomalydino_core.runtimes import OPENVINO_TOKEN_MULTIPLE, export_rule

    assert "padded" not in export_rule("onnx")

    tokens = 1 + (RES // 14) ** 2  # class token + patches
    padded = -(-tokens // OPENVINO_TOKEN_MULTIPLE) * OPENVINO_TOKEN_MULTIPLE
    assert padded > tokens
    folder, _ = ensure_export(backbones["dinov2_vits14"], "openvino", (RES, RES), cache / "exports")
    assert "padded" in json.loads((folder / "manifest.json").read_text())["key"]["rule"]
    model = ov.Core().read_model(str(folder / "model.xml"))
    shapes = {
        tuple(op.get_output_partial_shape(0).to_shape())
        for op in model.get_ordered_ops()
        if op.get_type_name() == "Constant"
    }
    assert (1, 1, 1, padded) in shapes and (1, 1, 1, tokens) not in shapes
