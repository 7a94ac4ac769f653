"""Embedding runtimes: what runs the backbone's forward pass (see docs/runtimes.md).

- ``torch``: the backbone module in eager mode (bf16 under autocast); the only one on CUDA;
- ``vit_cpu``: DINOv2 under bf16 on CPU with the hand-written block loop (``backbones/vit_cpu.py``);
- ``openvino`` / ``onnx``: the module exported per input size and run by OpenVINO (bf16 or fp32)
  or ONNX Runtime (fp32), each checked against fp32 torch before use.

Every runner maps a (B, 3, H, W) float32 batch to the (B, gh, gw, C) float32 grid of the torch
module. ``measure`` picks the fastest by interleaved timing; the cache of that choice and of the
exported files is ``tasks/runtimes.py``.

The names below load their module on first use (PEP 562): the settings model imports
``runtimes.selection`` to validate a setting, and the command line must not import torch just
to refuse a bad name (``tests/flows/test_clean_failures.py``: under 2 s).
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULE_OF = {
    **dict.fromkeys(
        [
            "CALIBRATION_ROUNDS", "REQUEST_MARGIN", "Calibration", "RuntimeFigures", "beside",
            "fold_request_sizes", "measure", "openvino_variants", "request_mode",
        ],
        "calibration",
    ),
    **dict.fromkeys(
        [
            "EXPORT_RULE", "MIN_PATCH_COSINE", "OPENVINO_TOKEN_MULTIPLE", "ONNX_OPSET",
            "BatchRunner", "ExportCheck", "export_rule", "OnnxRunner", "OpenVinoRunner",
            "PerShapeRunner", "RuntimeRejected",
            "check_against_torch", "compress_int8", "exportable_module", "onnx_session_options",
            "int8_rule", "openvino_version", "patch_cosines", "probe_batch", "to_onnx",
            "to_openvino",
        ],
        "exported",
    ),
    **dict.fromkeys(
        ["EXPORTED", "RUNTIME_NAMES", "applicability", "candidates", "runtime_precision"],
        "selection",
    ),
    **dict.fromkeys(["TorchRunner", "fp32_reference", "has_vit_cpu_blocks"], "torch_runner"),
}  # fmt: skip

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
