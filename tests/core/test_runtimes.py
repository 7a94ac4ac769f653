"""anomalydino_core.runtimes: interleaved measurement, runtime rules, per-shape dispatch."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from anomalydino_core.backbones import build_backbone
from anomalydino_core.features import PatchFeatureExtractor
from anomalydino_core.runtimes import (
    Calibration,
    PerShapeRunner,
    RuntimeFigures,
    RuntimeRejected,
    beside,
    candidates,
    exportable_module,
    fold_request_sizes,
    measure,
    openvino_variants,
    patch_cosines,
    probe_batch,
    request_mode,
    runtime_precision,
)


class _Clock:
    """A clock the candidates advance by their cost: the choice depends on costs, not load."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_measure_interleaves_rounds_and_picks_the_lowest_median():
    clock = _Clock()
    calls: list[str] = []
    costs = {"torch": [0.9, 0.9, 0.9, 0.9], "openvino": [0.5, 2.0, 0.5, 0.5], "onnx": [0.6] * 4}

    def candidate(name: str):
        def run() -> None:
            calls.append(name)
            clock.now += costs[name][calls.count(name) - 1]

        return run

    result = measure(
        {n: candidate(n) for n in costs}, images_per_call=2, rounds=3, clock=clock, settle_s=0
    )
    assert calls[:3] == ["torch", "openvino", "onnx"]  # the warm-up
    assert calls[3:6] == ["torch", "openvino", "onnx"]  # round 1
    assert calls[6:9] == ["openvino", "onnx", "torch"]  # round 2: order rotated
    assert result.choice == "openvino"  # a slow round (2.0) does not move the median
    figures = {f.runtime: f for f in result.figures}
    assert figures["openvino"].median_ms == pytest.approx(250.0)
    assert figures["openvino"].max_ms == pytest.approx(1000.0)
    assert [f.runtime for f in result.figures] == ["openvino", "onnx", "torch"]
    again = Calibration.from_dict(result.to_dict())  # the cached form reads back
    assert again.to_dict() == result.to_dict() and again.choice == "openvino"


def test_light_models_get_more_rounds_up_to_the_time_budget():
    clock = _Clock()

    def run(cost: float):
        def call() -> None:
            clock.now += cost

        return call

    fast = measure(
        {"a": run(0.01), "b": run(0.02)}, images_per_call=1, rounds=3, min_seconds=3.0,
        max_rounds=15, clock=clock, settle_s=0,
    )  # fmt: skip
    assert {f.rounds for f in fast.figures} == {15} and fast.choice == "a"
    slow = measure(
        {"a": run(0.9), "b": run(0.8)}, images_per_call=1, rounds=3, min_seconds=3.0,
        max_rounds=15, clock=clock, settle_s=0,
    )  # fmt: skip
    assert {f.rounds for f in slow.figures} == {3} and slow.choice == "b"  # 5.1 s after 3


def test_calibration_with_a_choice_it_has_no_figures_for_is_refused():
    data = {"choice": "onnx", "figures": [], "rejected": {}}
    with pytest.raises(ValueError, match="no figures"):
        Calibration.from_dict(data)
    with pytest.raises(ValueError, match="no runtime"):
        measure({}, images_per_call=1)


def _figures(medians: dict[str, float]) -> tuple[RuntimeFigures, ...]:
    figures = [RuntimeFigures(name, ms, ms, ms, 3) for name, ms in medians.items()]
    return tuple(sorted(figures, key=lambda f: f.median_ms))


@pytest.mark.parametrize(
    ("medians", "choice", "images", "streams"),
    [
        ({"torch": 75.0, "openvino": 78.0, "openvino/8": 72.0}, "openvino", 8, 1),  # 7.7% faster
        ({"torch": 75.0, "openvino": 74.0, "openvino/8": 71.0}, "openvino", 1, 1),  # 4%: memory
        ({"torch": 72.0, "openvino": 78.0, "openvino/8": 71.0}, "openvino", 8, 1),  # 9%, fastest
        ({"torch": 72.0, "openvino": 74.0, "openvino/8": 71.0}, "torch", 1, 1),  # 4%: the next
        ({"torch": 70.0, "openvino": 78.0, "openvino/8": 72.0}, "torch", 1, 1),
        ({"torch": 80.0, "openvino": 78.0}, "openvino", 1, 1),  # batch 1: no variant measured
        (  # streams fastest by far
            {"torch": 75.0, "openvino": 80.0, "openvino/2": 78.0, "openvino/2 streams": 70.0},
            "openvino", 1, 2,
        ),
        (  # the whole batch per request 7.5% faster, streams less
            {"torch": 75.0, "openvino": 80.0, "openvino/2": 74.0, "openvino/2 streams": 77.0},
            "openvino", 2, 1,
        ),
        (  # streams fastest but within the margin: one image per request, one stream
            {"torch": 75.0, "openvino": 73.0, "openvino/2": 74.0, "openvino/2 streams": 72.0},
            "openvino", 1, 1,
        ),
    ],
)  # fmt: skip
def test_openvino_request_modes_fold_into_one_choice(medians, choice, images, streams):
    figures = _figures(medians)
    measured = Calibration(figures[0].runtime, figures)
    folded = fold_request_sizes(measured)
    assert (folded.choice, folded.request_images, folded.streams) == (choice, images, streams)
    assert {f.runtime for f in folded.figures} == {n for n in medians if "/" not in n}
    variants = {n.split("/")[1]: ms for n, ms in medians.items() if "/" in n}
    if variants:
        modes = {f.runtime: f.median_ms for f in folded.request_figures}
        assert modes == {"1": medians["openvino"], **variants}
        assert Calibration.from_dict(folded.to_dict()) == folded
    else:
        assert folded == measured


def test_openvino_variants_and_their_request_modes():
    assert openvino_variants(1, 2) == ["openvino"]
    assert openvino_variants(2, 1) == ["openvino", "openvino/2"]
    assert openvino_variants(2, 2) == ["openvino", "openvino/2", "openvino/2 streams"]
    assert openvino_variants(8, 4)[-1] == "openvino/4 streams"
    assert request_mode("8") == (8, 1) and request_mode("2 streams") == (1, 2)
    for bad in ("0", "two", "2 threads", "-1 streams"):
        with pytest.raises(ValueError, match="request variant"):
            request_mode(bad)


def test_calibration_keeps_its_request_mode_and_older_files_mean_one():
    figures = [{"runtime": "openvino", "median_ms_per_image": 66.0, "min_ms_per_image": 65.0,
                "max_ms_per_image": 70.0, "rounds": 3}]  # fmt: skip
    old = Calibration.from_dict({"choice": "openvino", "figures": figures})
    assert (old.request_images, old.streams, old.request_figures) == (1, 1, ())
    sizes = [{**figures[0], "runtime": "1", "median_ms_per_image": 73.5},
             {**figures[0], "runtime": "8", "median_ms_per_image": 65.9}]  # fmt: skip
    new = Calibration.from_dict({**old.to_dict(), "request_images": 8, "request_figures": sizes})
    assert Calibration.from_dict(new.to_dict()) == new and new.request_images == 8
    assert "8 image(s) per request (ms/img by images per request: 1: 73.5, 8: 65.9)" in new.text()
    modes = [sizes[0], {**figures[0], "runtime": "2 streams", "median_ms_per_image": 60.1}]
    streamed = Calibration.from_dict({**old.to_dict(), "streams": 2, "request_figures": modes})
    assert Calibration.from_dict(streamed.to_dict()) == streamed
    assert (
        "2 streams, one image per request (ms/img by images per request: 1: 73.5, 2 streams: 60.1)"
        in streamed.text()
    )
    for field in ("request_images", "streams"):
        with pytest.raises(ValueError, match=field):
            Calibration.from_dict({**old.to_dict(), field: 0})


def test_beside_runs_its_work_on_one_thread_during_the_block_only():
    calls: list[str] = []

    def work() -> None:
        calls.append(threading.current_thread().name)
        time.sleep(0.001)

    with beside(work, duty=0.5):
        time.sleep(0.2)
        during = len(calls)
    time.sleep(0.05)
    assert during > 10 and set(calls) == {"calibration-beside"}
    assert len(calls) - during <= 5  # a call or so in flight when the block ended, then none
    assert not any(t.name == "calibration-beside" for t in threading.enumerate())


def test_runtime_rules():
    installed = frozenset({"openvino", "onnx"})
    names, why = candidates(
        device_type="cpu", precision="bf16", has_vit_cpu=True, installed=installed
    )
    assert names == ["torch", "vit_cpu", "openvino"] and "fp32 only" in why["onnx"]
    names, why = candidates(
        device_type="cpu", precision="fp32", has_vit_cpu=False, installed=frozenset()
    )
    assert names == ["torch"] and "pip" in why["openvino"] and "DINOv2" in why["vit_cpu"]
    names, why = candidates(
        device_type="cuda", precision="bf16", has_vit_cpu=True, installed=installed
    )
    assert names == ["torch"] and "CPU only" in why["openvino"]
    assert runtime_precision("onnx", "auto") == "fp32"
    assert runtime_precision("openvino", "auto") == "auto"
    with pytest.raises(ValueError, match="fp32 only"):
        runtime_precision("onnx", "bf16")


def test_int8_weights_run_through_openvino_only():
    installed = frozenset({"openvino", "onnx", "int8"})
    names, why = candidates(
        device_type="cpu", precision="int8", has_vit_cpu=True, installed=installed
    )
    assert names == ["openvino"] and set(why) == {"torch", "vit_cpu", "onnx"}
    assert all("int8 weights run through openvino" in reason for reason in why.values())
    names, why = candidates(
        device_type="cpu", precision="int8", has_vit_cpu=True, installed=installed - {"int8"}
    )
    assert names == [] and "nncf" in why["openvino"]
    names, why = candidates(
        device_type="cuda", precision="int8", has_vit_cpu=True, installed=installed
    )
    assert names == [] and "CPU only" in why["openvino"]
    assert runtime_precision("openvino", "int8") == runtime_precision("auto", "int8") == "int8"
    for runtime in ("torch", "vit_cpu", "onnx"):
        with pytest.raises(ValueError, match="int8 runs through OpenVINO only"):
            runtime_precision(runtime, "int8")


def test_torch_and_vit_cpu_runners_give_the_extractors_grids():
    backbone = build_backbone("dinov2_vits14")
    ex = PatchFeatureExtractor(backbone, resolution=112, precision="bf16", device="cpu")
    x = torch.randn(2, 3, 112, 140)
    assert ex.runtime == "vit_cpu"  # the default before runtimes could be chosen
    timm_blocks = ex.torch_runner(vit_cpu_blocks=False)
    loop = ex.torch_runner(vit_cpu_blocks=True)
    assert (timm_blocks.name, loop.name) == ("torch", "vit_cpu")
    a, b = timm_blocks(x), loop(x)
    assert a.shape == b.shape == (2, 8, 10, 384) and not np.array_equal(a, b)
    assert patch_cosines(a, b).min() >= 0.999
    np.testing.assert_array_equal(ex._run(x), b)
    ex.use_runner(timm_blocks)  # the module follows, so FoundAD's pass runs the same blocks
    assert ex.runtime == "torch" and backbone.module.cpu_bf16_blocks is False
    np.testing.assert_array_equal(ex._run(x), a)


def test_per_shape_runner_builds_once_per_size_and_falls_back_with_the_reason():
    built: list[tuple[int, int]] = []

    def build(hw):
        built.append(hw)
        if hw[1] != hw[0]:
            raise RuntimeRejected(f"no export for {hw}")
        return lambda batch: np.ones((batch.shape[0], 1, 1, 1), np.float32)

    runner = PerShapeRunner("openvino", build, fallback=lambda b: np.zeros((b.shape[0], 1, 1, 1)))
    assert runner(torch.zeros(2, 3, 4, 4)).sum() == 2
    assert runner(torch.zeros(1, 3, 4, 4)).sum() == 1
    assert runner(torch.zeros(1, 3, 4, 8)).sum() == 0  # torch ran it
    runner(torch.zeros(1, 3, 4, 8))
    assert built == [(4, 4), (4, 8)]
    assert runner.fallback_reasons == {(4, 8): "no export for (4, 8)"}


@pytest.mark.parametrize(("name", "input_hw"), [("dinov2_vits14", (448, 448)),
                                                 ("dinov2_vits14_reg", (224, 308))])  # fmt: skip
def test_exportable_vit_pads_its_tokens_and_masks_them_out(name, input_hw):
    """OpenVINO's export pads a ViT's tokens to a multiple of 32: the padding is masked out of
    every attention, so the features are the module's own; unmasked, it would change them."""
    torch.manual_seed(0)
    module = build_backbone(name).module.eval()
    with torch.no_grad():
        for param_name, param in module.named_parameters():
            if param_name.endswith("gamma"):
                param.uniform_(0.2, 1.0)  # LayerScale far from its 1e-5 init: attention matters
    x = probe_batch(input_hw, batch=2)
    padded = exportable_module(module, input_hw, token_multiple=32)
    tokens = module.vit.num_prefix_tokens + (input_hw[0] // 14) * (input_hw[1] // 14)
    assert padded.padding > 0 and (tokens + padded.padding) % 32 == 0
    with torch.inference_mode():
        reference = module(x)
        torch.testing.assert_close(padded(x), reference, rtol=1e-5, atol=1e-5)
        padded.key_mask.zero_()  # the padding visible to attention
        assert (padded(x) - reference).abs().max().item() > 1e-3


def test_exportable_cnn_has_no_tokens_to_pad():
    module = build_backbone("efficientnet_lite0").module.eval()
    x = probe_batch((224, 224), batch=1)
    with torch.inference_mode():
        exported = exportable_module(module, (224, 224), token_multiple=32)(x)
        torch.testing.assert_close(exported, module(x), rtol=0, atol=0)
