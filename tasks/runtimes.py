"""The embedding runtime of a model on this machine: forced, or measured once and cached.

``model.runtime=auto`` on CPU: the first use of a (CPU model + its bf16/AMX/AVX flags, torch
threads, backbone + weights sha256, resolution, batch, precision, library versions, candidate
runtimes) measures every candidate (``anomalydino_core.runtimes.measure``: interleaved rounds,
median, beside the pipeline's preprocessing on one thread: ``BESIDE_WORK``) and writes the
choice with its figures to ``<cache>/runtimes/<backbone>-<resolution>-<digest>.json``; later
processes read it and measure nothing. Delete the file (or change the key) to measure again.
On CUDA ``auto`` is torch.

``<cache>`` is this machine's cache (``tasks/machine.py``); exported models live under
``<cache>/exports`` (``tasks/exports.py``). An exported runtime is checked against fp32 torch
(cosine >= 0.999 per patch) on its first use per input size on this machine; the outcome is kept
beside the export (``tasks/export_checks.py``). A failed check or export leaves that size to
torch, with the reason logged (and, during calibration, recorded in the JSON as ``rejected``).
``model.precision=int8`` runs OpenVINO's int8 export only (torch in fp32 for a rejected size).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from anomalydino_core.features import PatchFeatureExtractor, to_input_tensor
from anomalydino_core.runtimes import (
    EXPORTED,
    BatchRunner,
    Calibration,
    PerShapeRunner,
    RuntimeRejected,
    applicability,
    beside,
    candidates,
    check_against_torch,
    export_rule,
    fold_request_sizes,
    has_vit_cpu_blocks,
    measure,
    openvino_variants,
    probe_batch,
    request_mode,
)
from tasks.export_checks import check_file, read_check, write_check
from tasks.exports import ensure_export, exporter_versions, open_export, stored_weights
from tasks.machine import cache_root, cpu_identity, machine_name, write_cache_json

log = logging.getLogger(__name__)


def installed_runtimes() -> frozenset[str]:
    """The exported runtimes whose packages are installed (OpenVINO; ONNX Runtime with the
    onnx + onnxscript exporter), and ``int8`` where nncf (OpenVINO's int8 weights) is."""
    found = set()
    if importlib.util.find_spec("openvino") is not None:
        found.add("openvino")
    if importlib.util.find_spec("nncf") is not None:
        found.add("int8")
    if all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx", "onnxscript")):
        found.add("onnx")
    return frozenset(found)


@dataclass(frozen=True)
class RuntimeDecision:
    """Which runtime embeds, why, and the measurement behind it (None: nothing measured)."""

    requested: str
    runtime: str
    calibration: Calibration | None = None
    measured_now: bool = False
    cache_file: Path | None = None

    def text(self) -> str:
        if self.calibration is None:
            return f"runtime {self.runtime} (model.runtime={self.requested})"
        source = "measured now" if self.measured_now else f"cached in {self.cache_file}"
        return f"{self.calibration.text()}, {source}"


def calibration_key(
    extractor: PatchFeatureExtractor, threads: int, runtimes: list[str]
) -> dict[str, object]:
    """What a calibration's outcome depends on (see the module docstring)."""
    identity = extractor.backbone.identity
    versions = {"torch": torch.__version__}
    for name in runtimes:
        if name in EXPORTED:
            versions.update(exporter_versions(name))
            versions[f"{name} export"] = export_rule(name)
    return {
        "cpu": cpu_identity(),
        "threads": int(threads),
        "backbone": identity.name,
        "weights_sha256": identity.weights_sha256,
        "resolution": extractor.preprocess.resolution,
        "batch_size": extractor.batch_size,
        "precision": extractor.precision,
        "runtimes": list(runtimes),
        "openvino_variants": (
            openvino_variants(extractor.batch_size, threads) if "openvino" in runtimes else []
        ),
        "versions": versions,
        "measured_beside": BESIDE_WORK,
    }


def calibration_file(key: Mapping[str, object], root: Path) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return root / "runtimes" / f"{key['backbone']}-{key['resolution']}-{digest}.json"


def read_calibration(path: Path, key: Mapping[str, object]) -> Calibration | None:
    """The cached calibration of ``key`` in ``path`` (None: absent, unreadable, another key)."""
    try:
        data = json.loads(path.read_text())
        if data.get("key") != json.loads(json.dumps(key)):
            return None
        return Calibration.from_dict(data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("runtime calibration %s unreadable, measuring again: %s", path, exc)
        return None


def write_calibration(path: Path, key: Mapping[str, object], calibration: Calibration) -> None:
    data = {"key": key, **calibration.to_dict(), "measured_at": dt.datetime.now(dt.UTC).isoformat()}
    write_cache_json(path, data)


def _exported_runner(
    extractor: PatchFeatureExtractor,
    fmt: str,
    threads: int,
    root: Path,
    input_hw: tuple[int, int],
    *,
    streams: int = 1,
) -> BatchRunner:
    """Export (or find) ``fmt`` for ``input_hw``, open it (OpenVINO: in ``streams`` streams)
    and check it against fp32 torch."""
    try:
        stored = stored_weights(extractor.precision)
        folder, _ = ensure_export(extractor.backbone, fmt, input_hw, root / "exports", stored)
        runner = open_export(
            folder,
            fmt,
            precision=extractor.precision,
            threads=threads,
            machine=machine_name(),
            streams=streams,
        )
    except Exception as exc:  # an exporter or compiler error of any kind: torch runs it
        raise RuntimeRejected(f"{fmt} export failed ({type(exc).__name__}: {exc})") from exc
    path = check_file(folder, fmt, extractor.precision, threads, input_hw, streams)
    check = read_check(path)
    if check is None:
        check = check_against_torch(runner, fmt, extractor.module, input_hw)
        write_check(path, check)
    if not check.passed:
        raise RuntimeRejected(check.text())
    log.info("%s", check.text())
    return runner


def build_runner(
    extractor: PatchFeatureExtractor, runtime: str, threads: int, root: Path, *, streams: int = 1
) -> BatchRunner:
    """A runner of ``runtime`` for ``extractor`` (exported ones: per input size, torch for a
    size whose export fails its check; OpenVINO in ``streams`` streams)."""
    if runtime in ("torch", "vit_cpu"):
        return extractor.torch_runner(vit_cpu_blocks=runtime == "vit_cpu")
    build = partial(_exported_runner, extractor, runtime, threads, root, streams=streams)
    return PerShapeRunner(runtime, build, fallback=extractor.torch_runner())


def why_not(extractor: PatchFeatureExtractor, runtime: str) -> str | None:
    """None when ``runtime`` can run ``extractor``'s model here, else why not."""
    return applicability(
        runtime,
        device_type=extractor.device.type,
        precision=extractor.precision,
        has_vit_cpu=has_vit_cpu_blocks(extractor.module),
        installed=installed_runtimes(),
    )


def attach_runtime(
    extractor: PatchFeatureExtractor,
    runtime: str,
    *,
    threads: int,
    root: Path | None = None,
    remeasure: bool = False,
    rounds: int | None = None,
) -> RuntimeDecision:
    """Give ``extractor`` the runtime ``runtime`` (``auto``: calibrated, see the module doc).

    A forced runtime that cannot run this model here is an error naming the reason.
    ``remeasure``: measure even when a cached choice exists (the benches).
    """
    root = root or cache_root()
    if runtime != "auto":
        why = why_not(extractor, runtime)
        if why is not None:
            raise ValueError(f"model.runtime={runtime}: {why}")
        extractor.use_runner(build_runner(extractor, runtime, threads, root))
        return RuntimeDecision(runtime, runtime)
    names, left_out = candidates(
        device_type=extractor.device.type,
        precision=extractor.precision,
        has_vit_cpu=has_vit_cpu_blocks(extractor.module),
        installed=installed_runtimes(),
    )
    if not names:
        reasons = "; ".join(f"{name}: {why}" for name, why in left_out.items())
        raise ValueError(
            f"model.precision={extractor.precision}: no runtime runs it here ({reasons})"
        )
    modes = openvino_variants(extractor.batch_size, threads) if names == ["openvino"] else names
    if len(names) == 1 and len(modes) == 1:  # nothing to choose between
        if names[0] != extractor.runtime:
            extractor.use_runner(build_runner(extractor, names[0], threads, root))
        return RuntimeDecision("auto", names[0])
    key = calibration_key(extractor, threads, names)
    path = calibration_file(key, root)
    cached = None if remeasure else read_calibration(path, key)
    if cached is not None:
        runner = build_runner(extractor, cached.choice, threads, root, streams=cached.streams)
        if isinstance(runner, PerShapeRunner):
            runner.set_request_images(cached.request_images)
        extractor.use_runner(runner)
        return RuntimeDecision("auto", cached.choice, cached, False, path)
    calibration, runners = calibrate(extractor, names, threads, root, rounds=rounds)
    write_calibration(path, key, calibration)
    extractor.use_runner(runners[calibration.choice])
    decision = RuntimeDecision("auto", calibration.choice, calibration, True, path)
    log.info("%s", decision.text())
    return decision


def calibrate(
    extractor: PatchFeatureExtractor,
    names: list[str],
    threads: int,
    root: Path,
    *,
    rounds: int | None = None,
) -> tuple[Calibration, dict[str, BatchRunner]]:
    """(the calibration, its runners) of ``names`` measured on a (batch, 3, resolution,
    resolution) batch with ``threads`` torch threads, beside ``BESIDE_WORK``; exported runtimes
    that fail their export or check are left out with the reason. OpenVINO runs as two
    candidates when the batch holds several images (``timed_calls``; ``fold_request_sizes``
    decides between them)."""
    size = extractor.preprocess.resolution
    batch = probe_batch((size, size), batch=extractor.batch_size)
    runners: dict[str, BatchRunner] = {}
    rejected: dict[str, str] = {}
    for name in names:
        runner = build_runner(extractor, name, threads, root)
        if isinstance(runner, PerShapeRunner):
            runner.runner_for((size, size))
            if (size, size) in runner.fallback_reasons:
                rejected[name] = runner.fallback_reasons[(size, size)]
                continue
        runners[name] = runner
    if not runners:  # every candidate failed its export or check (int8 weights): torch runs it
        runners["torch"] = extractor.torch_runner()
    add_stream_variant(runners, extractor, threads, root, rejected)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        calls = timed_calls(runners, batch)
        # rounds given: exactly that many (tests, bench); else measure's time budget decides
        extra = {} if rounds is None else {"rounds": rounds, "min_seconds": 0.0}
        with beside(preprocessing_work(extractor)):
            measured = measure(calls, images_per_call=batch.shape[0], rejected=rejected, **extra)
    finally:
        torch.set_num_threads(saved_threads)
    calibration = fold_request_sizes(measured)
    if calibration.choice == "openvino" and calibration.streams > 1:
        runners["openvino"] = runners[f"openvino/{calibration.streams} streams"]
    elif calibration.choice == "openvino":
        runners["openvino"].set_request_images(calibration.request_images)
    return calibration, runners


def add_stream_variant(
    runners: dict[str, BatchRunner],
    extractor: PatchFeatureExtractor,
    threads: int,
    root: Path,
    rejected: dict[str, str],
) -> None:
    """Beside ``runners["openvino"]``, the same export compiled in streams
    (``openvino_variants``' ``openvino/<n> streams``), where the batch holds several images and
    there are several threads; a compile or check that fails goes to ``rejected``."""
    variant = next(
        (v for v in openvino_variants(extractor.batch_size, threads) if v.endswith(" streams")),
        None,
    )
    if "openvino" not in runners or variant is None:
        return
    size = extractor.preprocess.resolution
    _, streams = request_mode(variant.split("/", 1)[1])
    runner = build_runner(extractor, "openvino", threads, root, streams=streams)
    if runner.runner_for((size, size)) is runner.fallback:
        rejected[variant] = runner.fallback_reasons[(size, size)]
    else:
        runners[variant] = runner


def timed_calls(
    runners: Mapping[str, BatchRunner], batch: torch.Tensor
) -> dict[str, Callable[[], np.ndarray]]:
    """One call of each runner on ``batch``; with several images in the batch OpenVINO gives
    two: one image per request (``openvino``) and the whole batch per request
    (``openvino/<batch>``), on the same compiled model, its request size set before each call."""
    calls = {name: partial(runner, batch) for name, runner in runners.items()}
    openvino = runners.get("openvino")
    if isinstance(openvino, PerShapeRunner) and batch.shape[0] > 1:
        calls["openvino"] = partial(_in_requests_of, openvino, 1, batch)
        calls[f"openvino/{batch.shape[0]}"] = partial(
            _in_requests_of, openvino, batch.shape[0], batch
        )
    return calls


def _in_requests_of(runner: PerShapeRunner, images: int, batch: torch.Tensor) -> np.ndarray:
    runner.set_request_images(images)
    return runner(batch)


#: What the calibration runs beside its candidates (``anomalydino_core.runtimes.beside``): the
#: pipeline's preprocessing of a 900 x 900 image, as its decoding threads do while the model runs.
BESIDE_WORK = "to_input_tensor 900x900, half of one thread"


def preprocessing_work(extractor: PatchFeatureExtractor) -> partial:
    """One preprocessing of a seeded 900 x 900 RGB image for ``extractor`` (``BESIDE_WORK``)."""
    image = np.random.default_rng(0).integers(0, 256, (900, 900, 3), dtype=np.uint8)
    return partial(to_input_tensor, image, extractor.preprocess)
