"""Exported runtimes: the backbone traced for one input size and run by OpenVINO or ONNX Runtime.

What is exported: the module's fp32 forward for one input (H, W) with a dynamic batch, the same
(B, H/p, W/p, C) float32 patch grid as the torch module (DINOv2: its position embedding is
resampled in torch for that grid and stored as a constant, so the graph holds no bicubic
antialiased resize, which neither exporter handles; EfficientNet: TensorFlow 'same' padding
becomes constant pads). Another image shape is another export: pipeline images of one product
share a shape, so one or two exports serve a product; a per-shape compile costs a few seconds
once (ViT-S/14 448: conversion 13 s, compilation 0.4 s on a 2-core AMD EPYC), where a dynamic
(H, W) graph would have to carry the resize.

Precision: the exported weights stay fp32 (OpenVINO's IR is saved without fp16 compression);
bf16 is OpenVINO's compile hint (``INFERENCE_PRECISION_HINT``), so one export serves fp32 and
bf16. ONNX Runtime has no bf16 matrix kernels on CPU: it runs fp32 only. ``int8`` is another
OpenVINO export (:func:`compress_int8`): the linear layers' weights stored as int8.

Every exported runner is checked against the fp32 torch module on a probe batch before use
(:func:`check_against_torch`, cosine >= 0.999 per patch); a failure, or any error while
exporting or compiling, raises :class:`RuntimeRejected` and :class:`PerShapeRunner` falls back
to torch for that shape with the reason logged.

File I/O (saving and reading exports, the content hashes) is ``tasks/runtimes.py``'s job; this
module converts in memory and runs what it is given.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .torch_runner import fp32_reference

log = logging.getLogger(__name__)

#: Least per-patch cosine similarity of an exported runtime's features to fp32 torch.
MIN_PATCH_COSINE = 0.999
#: ONNX opset of the exports (torch.onnx's dynamo exporter; Resize/pads/LayerNorm all native).
ONNX_OPSET = 18
#: Version of how this module builds an export; part of every export's cache key.
EXPORT_RULE = "fixed-hw-dynamic-batch-v1"
#: OpenVINO exports pad a ViT's tokens to a multiple of this (``_FixedGridEncoder``: the same
#: features, 12% less time for ViT-S/14 at 448 on the Intel Xeon with AMX); ONNX Runtime's
#: attention is unfused matrix products, for which padding is only more work.
OPENVINO_TOKEN_MULTIPLE = 32


def export_rule(fmt: str) -> str:
    """How an export of format ``fmt`` is built (part of its cache key)."""
    if fmt == "openvino":
        return f"{EXPORT_RULE}, tokens padded to a multiple of {OPENVINO_TOKEN_MULTIPLE}"
    return EXPORT_RULE


BatchRunner = Callable[[torch.Tensor], np.ndarray]


class RuntimeRejected(RuntimeError):
    """An exported runtime cannot serve an input shape; the message says why."""


def exportable_module(
    module: torch.nn.Module, input_hw: tuple[int, int], *, token_multiple: int = 1
) -> torch.nn.Module:
    """An fp32, contiguous-memory module computing ``module``'s features for inputs of
    ``input_hw`` (the backbone's ``fixed_shape_module``, a ViT's tokens padded to a multiple of
    ``token_multiple``; else a copy of the module itself)."""
    height, width = input_hw
    fixed = getattr(module, "fixed_shape_module", None)
    if fixed is not None:
        out = fixed(height, width, token_multiple=token_multiple)
    else:
        out = copy.deepcopy(module)
    return out.float().to(memory_format=torch.contiguous_format).eval()


def probe_batch(input_hw: tuple[int, int], batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A seeded normalised-image-like batch (B, 3, H, W) for checks and timing."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *input_hw, generator=generator)


def openvino_version() -> str:
    import openvino

    return openvino.get_version()


def to_openvino(module: torch.nn.Module, input_hw: tuple[int, int]):
    """The OpenVINO model (``openvino.Model``) of ``module`` for (any batch, 3, H, W)."""
    import openvino as ov

    model = exportable_module(module, input_hw, token_multiple=OPENVINO_TOKEN_MULTIPLE)
    with torch.inference_mode():
        return ov.convert_model(
            model,
            example_input=probe_batch(input_hw),
            input=[ov.PartialShape([-1, 3, *input_hw])],
        )


#: Layers whose weights :func:`compress_int8` leaves fp32: convolutions (EfficientNet-Lite0's
#: depthwise ones in int8 reached a least patch cosine of 0.9968 to fp32 at 224 and failed the
#: check; a ViT's only convolution is its patch embedding). Part of an int8 export's key.
INT8_KEEPS_FP32 = ("Convolution", "GroupConvolution")


def int8_rule() -> str:
    """How :func:`compress_int8` compresses (part of an int8 export's key)."""
    return f"int8 symmetric per output channel, {' and '.join(INT8_KEEPS_FP32)} kept fp32"


def compress_int8(model):
    """``model`` (``openvino.Model``) with its linear layers' weights int8, symmetric per output
    channel (nncf's weight compression; a model with no linear layer, such as EfficientNet-Lite0,
    is left as it is). OpenVINO runs such a layer as one kernel that unpacks the weights block by
    block as it multiplies. Intel Xeon without bf16 (AVX-512 only), ViT-S/14 448, 2 threads, fp32
    hint: 48 "FullyConnectedCompressed" layers on AVX-512 fp32 brgemm where fp32 weights ran 36
    of them through MLAS; 190 against 248 ms/img (interleaved medians of 7), in 2 streams at
    batch 2 176-190 against 240-258 (226-228 against 314 beside the preprocessing); fp16 weights
    ran as fast as fp32. Least patch cosine to fp32 over 5 real bottle images 0.99967-0.99972
    (bf16: 0.99997), with random weights and the LayerScale gammas at 1: random init leaves them
    at 1e-5, which silences the blocks. OpenVINO's dynamic quantisation of the inputs left the
    features unchanged there."""
    import nncf

    nncf.set_log_level(logging.WARNING)  # its per-layer table goes to stdout otherwise
    return nncf.compress_weights(
        model,
        mode=nncf.CompressWeightsMode.INT8_SYM,
        ignored_scope=nncf.IgnoredScope(types=list(INT8_KEEPS_FP32), validate=False),
    )


def to_onnx(module: torch.nn.Module, input_hw: tuple[int, int]):
    """The ONNX program (``torch.onnx.ONNXProgram``, opset :data:`ONNX_OPSET`) of ``module``
    for (any batch, 3, H, W); input ``x``, output ``features``."""
    model = exportable_module(module, input_hw)
    batch = torch.export.Dim("batch", min=1, max=4096)
    return torch.onnx.export(
        model,
        (probe_batch(input_hw, batch=2),),
        dynamo=True,
        opset_version=ONNX_OPSET,
        dynamic_shapes={"x": {0: batch}},
        input_names=["x"],
        output_names=["features"],
        optimize=True,
        verbose=False,
    )


def openvino_compile_config(precision: str, threads: int, streams: int = 1) -> dict[str, object]:
    """CPU compile settings: the precision hint (bf16 | f32, also for int8 weights), ``threads``
    threads in all; one stream (latency mode: one request at a time, all threads on it) or
    ``streams`` streams sharing the threads, each running its own request."""
    config: dict[str, object] = {
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
        "INFERENCE_NUM_THREADS": int(threads),
        "PERFORMANCE_HINT": "LATENCY",
    }
    if streams > 1:
        config |= {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": int(streams)}
    return config


#: Images per OpenVINO inference request (a batch runs as consecutive requests) unless the
#: calibration measured the whole batch per request faster (``REQUEST_MARGIN``). ViT-S/14 448
#: bf16, 2 threads, one compiled model, interleaved, medians of 6 rounds, 1 / 2 / 4 / 8 images
#: per request: AMD EPYC (avx512_bf16) 202 / 200 / 208 / 211 ms per image; Intel Xeon (AMX)
#: 73.5 / 68.2 / 66.7 / 65.9. The requests' working memory: +0.06 GiB at 1 image, +0.21 at 8.
OPENVINO_REQUEST_IMAGES = 1


class OpenVinoRunner:
    """Runs a compiled OpenVINO model: (B, 3, H, W) -> (B, gh, gw, C) float32 numpy.

    One stream (``streams=1``): consecutive requests of ``request_images`` images (the
    calibration's choice, else ``OPENVINO_REQUEST_IMAGES``), each on every thread. ``streams``
    > 1: the threads split into that many streams and the batch's images run one per request,
    ``streams`` at a time; the same features (to the bit on the Xeon). Beside the pipeline's
    decoding threads a stream that loses its core stalls only itself, where one request on every
    thread waits for its slowest thread: ViT-S/14 448 bf16, 2 threads, batch 2 (Intel Xeon, AMX),
    interleaved medians of 6: 2 images per request 80.5 ms/img quiet, 132.6 beside
    ``BESIDE_WORK``; 2 streams 78.6 and 110.2. The calibration measures both."""

    name = "openvino"

    def __init__(
        self,
        model,
        *,
        precision: str,
        threads: int,
        cache_dir: str | None = None,
        streams: int = 1,
    ) -> None:
        """``model``: an ``ov.Model`` or the path of its IR; ``cache_dir``: OpenVINO's cache of
        compiled models (``CACHE_DIR``), read and written by OpenVINO itself."""
        import openvino as ov

        if streams < 1:
            raise ValueError(f"streams must be >= 1, got {streams}")
        core = ov.Core()
        if cache_dir is not None:
            core.set_property({"CACHE_DIR": str(cache_dir)})
        self.compiled = core.compile_model(
            model, "CPU", openvino_compile_config(precision, threads, streams)
        )
        self.streams = int(streams)
        self.requests = [self.compiled.create_infer_request() for _ in range(self.streams)]
        self.request = self.requests[0]
        self.request_images = OPENVINO_REQUEST_IMAGES  # PerShapeRunner sets the choice

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        x = np.ascontiguousarray(batch.detach().float().cpu().numpy())
        if self.streams > 1:
            return self._in_streams(x)
        output, step = self.compiled.output(0), self.request_images
        parts = [
            np.array(self.request.infer({0: x[i : i + step]})[output], dtype=np.float32, copy=True)
            for i in range(0, x.shape[0], step)
        ]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _in_streams(self, x: np.ndarray) -> np.ndarray:
        """One image per request, a request per stream at a time, outputs in batch order."""
        parts = []
        for start in range(0, x.shape[0], self.streams):
            running = self.requests[: min(self.streams, x.shape[0] - start)]
            try:
                for i, request in enumerate(running):
                    request.start_async({0: x[start + i : start + i + 1]})
                for request in running:
                    request.wait()  # raises the request's error
            finally:  # none left running into the next call, whatever failed
                for request in running:
                    with contextlib.suppress(Exception):
                        request.wait()
            for request in running:
                data = request.get_output_tensor(0).data
                parts.append(np.array(data, dtype=np.float32, copy=True))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def onnx_session_options(threads: int):
    """ONNX Runtime options: ``threads`` intra-op threads, one inter-op, every graph optimisation,
    no spinning between calls (spinning workers took the cores the pipeline's decoding threads
    and the next runtime need: torch ran 2-3x slower right after a spinning session here)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


class OnnxRunner:
    """Runs an ONNX Runtime CPU session: (B, 3, H, W) -> (B, gh, gw, C) float32 numpy."""

    name = "onnx"

    def __init__(self, session) -> None:
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        x = np.ascontiguousarray(batch.detach().float().cpu().numpy())
        return np.asarray(self.session.run(None, {self.input_name: x})[0], dtype=np.float32)


@dataclass(frozen=True)
class ExportCheck:
    """How an exported runtime's features compare with fp32 torch on the probe batch."""

    runtime: str
    input_hw: tuple[int, int]
    min_patch_cosine: float
    passed: bool

    def text(self) -> str:
        verdict = "passed" if self.passed else f"FAILED (needs >= {MIN_PATCH_COSINE})"
        return (
            f"{self.runtime} at {self.input_hw[0]}x{self.input_hw[1]}: least patch cosine to fp32 "
            f"torch {self.min_patch_cosine:.6f}, {verdict}"
        )


def patch_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each patch feature of two (..., C) grids of equal shape."""
    if a.shape != b.shape:
        raise ValueError(f"feature grids differ in shape: {a.shape} vs {b.shape}")
    a64 = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b64 = b.reshape(-1, b.shape[-1]).astype(np.float64)
    norms = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return (a64 * b64).sum(axis=1) / np.maximum(norms, 1e-30)


def check_against_torch(
    runner: BatchRunner, name: str, module: torch.nn.Module, input_hw: tuple[int, int]
) -> ExportCheck:
    """Compare ``runner`` with the fp32 torch ``module`` on a seeded probe batch of 2."""
    probe = probe_batch(input_hw, batch=2)
    reference = fp32_reference(module, probe)
    try:
        got = runner(probe)
        cosine = float(patch_cosines(got, reference).min())
    except ValueError as exc:  # wrong shape
        raise RuntimeRejected(f"{name} at {input_hw}: {exc}") from exc
    passed = bool(np.isfinite(cosine) and cosine >= MIN_PATCH_COSINE)
    return ExportCheck(name, tuple(input_hw), cosine, passed)


class PerShapeRunner:
    """An exported runtime compiled per input (H, W) on first use (``build``: exported, checked,
    ready to run; raises :class:`RuntimeRejected`), torch (``fallback``) for shapes it rejects."""

    def __init__(
        self, name: str, build: Callable[[tuple[int, int]], BatchRunner], fallback: BatchRunner
    ) -> None:
        self.name = name
        self.build = build
        self.fallback = fallback
        self.runners: dict[tuple[int, int], BatchRunner] = {}
        self.fallback_reasons: dict[tuple[int, int], str] = {}
        self.request_images = OPENVINO_REQUEST_IMAGES

    def set_request_images(self, images: int) -> None:
        """Images per inference request of every OpenVINO runner, built or still to come."""
        self.request_images = max(1, int(images))
        for runner in self.runners.values():
            if isinstance(runner, OpenVinoRunner):
                runner.request_images = self.request_images

    def runner_for(self, input_hw: tuple[int, int]) -> BatchRunner:
        runner = self.runners.get(input_hw)
        if runner is None:
            try:
                runner = self.build(input_hw)
            except RuntimeRejected as exc:
                log.warning(
                    "%s not used for inputs %s, torch runs them: %s", self.name, input_hw, exc
                )
                self.fallback_reasons[input_hw] = str(exc)
                runner = self.fallback
            if isinstance(runner, OpenVinoRunner):
                runner.request_images = self.request_images
            self.runners[input_hw] = runner
        return runner

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        return self.runner_for((int(batch.shape[-2]), int(batch.shape[-1])))(batch)
