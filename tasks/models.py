"""The backbone, loaded once per process and model settings, and what identifies its features.

Thread counts are part of a run's settings, not of the machine it lands on: torch convolutions
and BLAS reductions give bit-different results with different numbers of threads, so every task
pins the count resolved once by the flow (``ResolvedModel.threads``).

``compute_lock()``: one multi-threaded computation (a forward pass, a nearest-neighbour search)
at a time per process. Two OpenMP/BLAS thread teams running at once on the same cores spin
against each other and run 10-30x slower; the lock lets concurrent tasks overlap their I/O,
decoding and encoding with the computation instead. numpy/scipy BLAS runs single-threaded
(``pin_threads``), so the PCA masks need no lock.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import torch

from anomalydino_core.allocator import give_freed_memory_back, keep_freed_memory
from anomalydino_core.config import ModelSettings
from anomalydino_core.cpu import set_threads
from anomalydino_core.features import PatchFeatureExtractor, select_device
from anomalydino_core.runtimes import EXPORTED, runtime_precision
from tasks.process_start import malloc_tuning_wanted
from tasks.runtimes import attach_runtime
from tasks.storage import StorageConfig, atomic_write_bytes, read_bytes
from tasks.weights import load_backbone

log = logging.getLogger(__name__)

#: Version of how masks are computed at embedding time (stored with every embedding).
MASK_RULE = "pca1-v1"


_COMPUTE_LOCK = threading.RLock()


def compute_lock() -> threading.RLock:
    """The process-wide compute lock (a function, so that task functions pickled by value
    for Dask do not try to pickle the lock itself)."""
    return _COMPUTE_LOCK


def pin_threads(threads: int) -> None:
    """Use exactly ``threads`` threads for torch and faiss in this process, one for BLAS
    (``anomalydino_core.cpu.set_threads``) and one per OpenCV call (the callers' thread pools
    give it its parallelism)."""
    set_threads(threads)
    cv2.setNumThreads(1)


def tune_allocator(device: str | torch.device, runtime: str = "torch") -> bool:
    """On CPU, while torch computes the model (``runtime`` torch or vit_cpu), keep freed memory
    for reuse (``anomalydino_core.allocator.keep_freed_memory``: a quarter of a ViT forward
    pass) unless ``ANOMALYDINO_MALLOC_TUNING=0``; True when kept.

    An exported runtime allocates its buffers once: there glibc's thresholds come back and the
    freed heap is returned (``give_freed_memory_back``; peak RSS of the peer bench's 1-shot
    audit with OpenVINO, Intel Xeon with AMX: 1.79-1.90 GiB against 1.92, the same speed).
    Called where an extractor is built (``build_extractor``: before its runtime is calibrated,
    so that torch is measured as it would run, then with the runtime chosen) and before
    FoundAD's torch pass (``tasks/embed.py``)."""
    if select_device(str(device)).type != "cpu":
        return False
    if not malloc_tuning_wanted():
        return False
    if runtime in EXPORTED:
        give_freed_memory_back()
        return False
    return keep_freed_memory(True)


def default_threads(model: ModelSettings) -> int:
    """``model.threads`` or the torch default of this process (the physical cores)."""
    return int(model.threads or torch.get_num_threads())


@dataclass
class Embedder:
    """A ready extractor; forward passes run under ``compute_lock()``."""

    extractor: PatchFeatureExtractor
    settings: dict[str, Any]  # what the embedding store records (see ``feature_settings``)

    @property
    def key(self) -> str:
        return feature_key(self.settings)

    @property
    def runtime(self) -> str:
        """The runtime that embeds (torch, vit_cpu, openvino, onnx; ``tasks/runtimes.py``)."""
        return self.extractor.runtime

    @property
    def mask_threshold(self) -> float:
        return float(self.extractor.backbone.spec.mask_threshold)


def remote_fetcher(storage: StorageConfig | None):
    """Download weights given as a URI (s3://, https://, ...) through the storage layer."""

    def fetch(uri: str, dest: Path) -> None:
        atomic_write_bytes(str(dest), read_bytes(uri, storage))

    return fetch


_LOAD_LOCK = threading.Lock()


@functools.lru_cache(maxsize=4)
def _cached_embedder(model: ModelSettings, storage: StorageConfig | None) -> Embedder:
    backbone = load_backbone(
        model.backbone, weights=model.weights, fetch_remote=remote_fetcher(storage)
    )
    extractor = build_extractor(model, backbone)
    return Embedder(extractor, feature_settings(extractor))


def build_extractor(model: ModelSettings, backbone) -> PatchFeatureExtractor:
    """The feature extractor of ``model`` around a loaded backbone (allocator tuned first),
    embedding through ``model.runtime`` (``auto``: the calibrated choice, ``tasks/runtimes.py``)."""
    tune_allocator(model.device)
    extractor = PatchFeatureExtractor(
        backbone,
        resolution=model.resolution,
        precision=runtime_precision(model.runtime, model.precision),
        device=model.device,
        batch_size=model.batch_size,
    )
    decision = attach_runtime(extractor, model.runtime, threads=default_threads(model))
    tune_allocator(model.device, decision.runtime)
    log.info("%s: %s", backbone.identity.name, decision.text())
    return extractor


def embedder(model: ModelSettings, storage: StorageConfig | None = None) -> Embedder:
    """The process-wide embedder for ``model`` (loaded on first use)."""
    with _LOAD_LOCK:
        return _cached_embedder(model, storage)


def feature_settings(extractor: PatchFeatureExtractor) -> dict[str, Any]:
    """Everything that determines a stored embedding: backbone identity, preprocessing,
    precision, the feature dtype and the mask rule.

    The runtime (torch, vit_cpu, openvino, onnx) is deliberately not part of it. The key names
    the feature function, not a bit pattern: every runtime computes the same function at the
    same precision, and an exported one is only used after its features passed the check
    against fp32 torch (cosine >= 0.999 per patch; measured 0.99999 for ViT-S/14 448 in bf16,
    as close as torch's own bf16 paths are). bf16 vs fp32 stays in the key: that is a different
    function by choice. Bit-level differences already exist within a key (thread counts,
    oneDNN kernels per CPU) and are harmless because scores are reproduced from the stored
    float16 features, never recomputed: a re-run or re-evaluation reuses them whichever runtime
    the machine now calibrates to. Keying by runtime would instead make a store unreadable
    after a calibration flips (a faster OpenVINO release, another worker CPU) and re-embed
    every reference for no measurable difference.
    """
    settings = extractor.settings.to_dict()
    settings.update(
        feature_dtype="float16",
        mask_rule=MASK_RULE,
        mask_threshold=float(extractor.backbone.spec.mask_threshold),
    )
    return json.loads(json.dumps(settings, sort_keys=True))


def feature_key(settings: dict[str, Any]) -> str:
    """Readable, unique name of a feature setting: ``<backbone>-<resolution>-<precision>-<hash>``."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    resolution = settings["preprocess"]["resolution"]
    return f"{settings['backbone']}-{resolution}-{settings['precision']}-{digest}"
