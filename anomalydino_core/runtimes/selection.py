"""Which runtimes can run a model here: the rules behind ``model.runtime`` (auto or forced)."""

from __future__ import annotations

from typing import get_args

from ..choices import ModelPrecision, Precision, Runtime, RuntimeName

RUNTIME_NAMES: tuple[str, ...] = get_args(RuntimeName)
EXPORTED = ("openvino", "onnx")
#: The pip package each exported runtime needs (and OpenVINO's int8 weights: nncf compresses them).
PACKAGES = {"openvino": "openvino", "onnx": "onnxruntime onnx onnxscript", "int8": "nncf"}


def runtime_precision(runtime: Runtime, precision: Precision) -> Precision:
    """The precision setting a runtime runs with: ONNX Runtime runs fp32 only (``auto`` becomes
    fp32; an explicit bf16 is an error); int8 weights run through OpenVINO only (another forced
    runtime is an error); the others take the setting as it is."""
    if precision == "int8" and runtime not in ("auto", "openvino"):
        raise ValueError(
            f"precision int8 runs through OpenVINO only (its int8 weights are an OpenVINO "
            f"export), not runtime {runtime}: use --runtime auto or openvino, or another precision"
        )
    if runtime != "onnx":
        return precision
    if precision == "bf16":
        raise ValueError(
            "runtime onnx runs fp32 only (ONNX Runtime has no bf16 CPU kernels): "
            "use --precision fp32 or auto, or another runtime"
        )
    return "fp32"


def applicability(
    runtime: str,
    *,
    device_type: str,
    precision: ModelPrecision,
    has_vit_cpu: bool,
    installed: frozenset[str],
) -> str | None:
    """None when ``runtime`` can run this model here, else the reason it cannot. ``installed``:
    the exported runtimes whose packages are installed, and ``int8`` where nncf is."""
    if runtime not in RUNTIME_NAMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose auto or one of {RUNTIME_NAMES}")
    if precision == "int8" and runtime != "openvino":
        return f"{runtime} runs fp32 or bf16 (int8 weights run through openvino)"
    if runtime == "torch":
        return None
    if device_type != "cpu":
        return f"{runtime} runs on CPU only (device {device_type}: torch runs there)"
    if runtime == "vit_cpu":
        if not has_vit_cpu:
            return "vit_cpu runs plain DINOv2 ViT blocks only"
        if precision != "bf16":
            return "vit_cpu is a bf16 path (precision resolves to fp32)"
        return None
    if runtime not in installed:
        return f"{runtime} needs the pip package(s) {PACKAGES[runtime]}"
    if runtime == "onnx" and precision != "fp32":
        return "onnx runs fp32 only (the model runs bf16)"
    if precision == "int8" and "int8" not in installed:
        return f"int8 weights need the pip package {PACKAGES['int8']} (the int8 extra)"
    return None


def candidates(
    *, device_type: str, precision: ModelPrecision, has_vit_cpu: bool, installed: frozenset[str]
) -> tuple[list[str], dict[str, str]]:
    """(the runtimes ``auto`` measures, {runtime: why not} for the others)."""
    chosen: list[str] = []
    left_out: dict[str, str] = {}
    for name in RUNTIME_NAMES:
        why = applicability(
            name,
            device_type=device_type,
            precision=precision,
            has_vit_cpu=has_vit_cpu,
            installed=installed,
        )
        if why is None:
            chosen.append(name)
        else:
            left_out[name] = why
    return chosen, left_out
