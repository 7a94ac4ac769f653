"""Every choice list of the settings, defined once (no heavy imports: the CLI reads these).

The modules that implement a choice import its type from here, check values with
``typing.get_args`` and the settings model (``anomalydino_core/config.py``) uses the same types,
so the flags, the config file, the docs and the code always agree.
"""

from __future__ import annotations

from typing import Literal

MaskingMode = Literal["auto", "on", "off"]
Rotation = Literal["agnostic", "informed"]
Preprocess = Literal["agnostic", "informed", "masking_only", "none"]
ImageScoreMethod = Literal["top1p_mean", "max", "max_map"]
IndexKind = Literal["exact", "exact_bf16", "hnsw", "ivf"]
Statistic = Literal["code_mean", "quantile"]
#: The model's precision setting; ``int8``: int8 weights run by OpenVINO (docs/runtimes.md).
Precision = Literal["auto", "fp32", "bf16", "int8"]
#: What a model runs at once ``auto`` is resolved.
ModelPrecision = Literal["fp32", "bf16", "int8"]
#: Scoring's products (zero-shot tiles, FoundAD's torch passes): fp32 or bf16.
ComputePrecision = Literal["fp32", "bf16"]
Method = Literal["knn", "foundad"]
Scorer = Literal["knn", "foundad", "both"]
#: The embedding runtime: ``auto`` (the calibrated choice per machine) or one forced
#: (anomalydino_core/runtimes, docs/runtimes.md).
Runtime = Literal["auto", "torch", "vit_cpu", "openvino", "onnx"]
RuntimeName = Literal["torch", "vit_cpu", "openvino", "onnx"]
ExportFormat = Literal["openvino", "onnx"]
