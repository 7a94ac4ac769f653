"""Embedding runtimes: what runs the backbone's forward pass (see docs/runtimes.md).

- ``torch``: the backbone module in eager mode (bf16 under autocast); the only one on CUDA;
- ``vit_cpu``: DINOv2 under bf16 on CPU with the hand-written block loop (``backbones/vit_cpu.py``);
- ``openvino`` / ``onnx``: the module exported per input size and run by OpenVINO (bf16 or fp32)
  or ONNX Runtime (fp32), each checked against fp32 torch before use.

Every runner maps a (B, 3, H, W) float32 batch to the (B, gh, gw, C) float32 grid of the torch
module. ``measure`` picks the fastest by interleaved timing; the cache of that choice and of the
exported files is ``tasks/runtimes.py``.
"""

from .calibration import CALIBRATION_ROUNDS, Calibration, RuntimeFigures, measure
from .exported import (
    EXPORT_RULE,
    MIN_PATCH_COSINE,
    ONNX_OPSET,
    BatchRunner,
    ExportCheck,
    OnnxRunner,
    OpenVinoRunner,
    PerShapeRunner,
    RuntimeRejected,
    check_against_torch,
    exportable_module,
    onnx_session_options,
    openvino_version,
    patch_cosines,
    probe_batch,
    to_onnx,
    to_openvino,
)
from .selection import EXPORTED, RUNTIME_NAMES, applicability, candidates, runtime_precision
from .torch_runner import TorchRunner, fp32_reference, has_vit_cpu_blocks

__all__ = [
    "CALIBRATION_ROUNDS",
    "EXPORTED",
    "EXPORT_RULE",
    "MIN_PATCH_COSINE",
    "ONNX_OPSET",
    "RUNTIME_NAMES",
    "BatchRunner",
    "Calibration",
    "ExportCheck",
    "OnnxRunner",
    "OpenVinoRunner",
    "PerShapeRunner",
    "RuntimeFigures",
    "RuntimeRejected",
    "TorchRunner",
    "applicability",
    "candidates",
    "check_against_torch",
    "exportable_module",
    "fp32_reference",
    "has_vit_cpu_blocks",
    "measure",
    "onnx_session_options",
    "openvino_version",
    "patch_cosines",
    "probe_batch",
    "runtime_precision",
    "to_onnx",
    "to_openvino",
]
