"""Images in, patch-feature grids out: preprocessing, batching, device and precision."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .backbones import LoadedBackbone, PreprocessConfig
from .choices import ModelPrecision, Precision
from .config import ModelSettings
from .cpu import cpu_has_fast_bf16
from .runtimes import BatchRunner, TorchRunner

_DEFAULTS = ModelSettings()  # the library takes the settings model's defaults


def select_device(device: str = "auto") -> torch.device:
    """CUDA when present (``auto``), else CPU; never a hard dependency on CUDA."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_precision(
    precision: Precision, device: torch.device, *, prefer_bf16: bool = True
) -> ModelPrecision:
    """``auto``: bf16 where the hardware runs it natively (AMX / AVX512-BF16, or CUDA) and the
    backbone profits from it (``prefer_bf16``), else fp32. ``int8`` is never chosen by ``auto``:
    it is asked for (``anomalydino_core.runtimes.selection``: OpenVINO only)."""
    if precision != "auto":
        return precision
    if not prefer_bf16:
        return "fp32"
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def to_input_tensor(image: np.ndarray, config: PreprocessConfig) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> normalised float32 (3, h, w) at the aligned input size.

    With ``resize_dtype="uint8"`` torch's 8-bit antialiased resize runs (PIL's filter: within
    one grey level of PIL on real images, against up to 5 levels for the float resize, and
    10x faster: 1 ms instead of 10 for 900x900 -> 448x448).
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    height, width = config.input_size(image.shape[:2])
    if not image.flags.writeable:  # torch.from_numpy needs a writeable buffer (only read here)
        image = np.array(image, copy=True)
    x = torch.from_numpy(image).permute(2, 0, 1)[None]
    resize = (height, width) != image.shape[:2]
    if resize and config.resize_dtype == "uint8":
        x = F.interpolate(
            x, size=(height, width), mode=config.interpolation, antialias=config.antialias
        )
        resize = False
    x = x.float().div_(255.0)  # a new tensor: the caller's image is never written
    if resize:
        x = F.interpolate(
            x, size=(height, width), mode=config.interpolation, antialias=config.antialias
        ).clamp_(0.0, 1.0)
    mean = torch.tensor(config.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.std).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)[0]


@dataclass(frozen=True)
class FeatureSettings:
    """Everything that determines a feature value; features of different settings never mix."""

    backbone: str
    weights_sha256: str
    precision: str
    preprocess: PreprocessConfig

    def to_dict(self) -> dict:
        return {
            "backbone": self.backbone,
            "weights_sha256": self.weights_sha256,
            "precision": self.precision,
            "preprocess": self.preprocess.to_dict(),
        }


class PatchFeatureExtractor:
    """Embeds RGB images into (gh, gw, C) float32 patch-feature grids.

    Images of equal input size are batched together (``batch_size``); bf16 runs under autocast
    and the features are returned in float32.

    ``runner`` runs each batch: the torch module by default (``vit_cpu`` blocks for DINOv2 in
    bf16 on CPU, as before runtimes could be chosen); ``use_runner`` swaps in another runtime
    (``anomalydino_core.runtimes``; ``tasks/runtimes.py`` calibrates and attaches one). Every
    runner returns the same (B, gh, gw, C) grids; the runtime is no part of ``settings``
    (``tasks/models.py feature_settings`` says why). FoundAD (``embed_with_foundad``) always
    runs ``module``: an exported runtime has no FoundAD layer (docs/runtimes.md).
    """

    def __init__(
        self,
        backbone: LoadedBackbone,
        *,
        resolution: int = _DEFAULTS.resolution,
        precision: Precision = _DEFAULTS.precision,
        device: str = _DEFAULTS.device,
        batch_size: int = _DEFAULTS.batch_size,
    ) -> None:
        self.backbone = backbone
        self.device = select_device(device)
        self.precision = resolve_precision(
            precision, self.device, prefer_bf16=backbone.spec.auto_bf16
        )
        self.preprocess = backbone.preprocess(resolution)
        self.batch_size = max(1, int(batch_size))
        if self.device.type == "cpu" and backbone.spec.cpu_batch_size:
            self.batch_size = min(self.batch_size, backbone.spec.cpu_batch_size)
        self.channels_last = backbone.spec.channels_last
        self.module = backbone.module.to(self.device)
        if self.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        self.runner: BatchRunner = self.torch_runner()

    def torch_runner(self, *, vit_cpu_blocks: bool | None = None) -> TorchRunner:
        """A torch runner of this extractor's module, device and precision (``vit_cpu_blocks``:
        see :class:`~anomalydino_core.runtimes.TorchRunner`)."""
        return TorchRunner(
            self.module,
            device=self.device,
            precision=self.precision,
            channels_last=self.channels_last,
            vit_cpu_blocks=vit_cpu_blocks,
        )

    @property
    def runtime(self) -> str:
        """Name of the runtime that embeds: torch, vit_cpu, openvino or onnx."""
        return str(getattr(self.runner, "name", type(self.runner).__name__))

    def use_runner(self, runner: BatchRunner) -> None:
        """Embed through ``runner`` from now on. A torch runner with a fixed block choice also
        sets the module's (DINOv2 ``cpu_bf16_blocks``), so FoundAD's pass runs the same blocks."""
        blocks = getattr(runner, "vit_cpu_blocks", None)
        if blocks is not None and hasattr(self.module, "cpu_bf16_blocks"):
            self.module.cpu_bf16_blocks = blocks
        self.runner = runner

    @property
    def settings(self) -> FeatureSettings:
        return FeatureSettings(
            backbone=self.backbone.identity.name,
            weights_sha256=self.backbone.identity.weights_sha256,
            precision=self.precision,
            preprocess=self.preprocess,
        )

    @property
    def feature_dim(self) -> int:
        return self.backbone.spec.feature_dim

    def _run(self, batch: torch.Tensor) -> np.ndarray:
        return self.runner(batch)

    def embed(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Patch-feature grids (gh, gw, C) float32 for RGB uint8 images, in input order."""
        tensors = [to_input_tensor(img, self.preprocess) for img in images]
        by_size: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, t in enumerate(tensors):
            by_size[tuple(t.shape)].append(i)
        out: list[np.ndarray | None] = [None] * len(tensors)
        for indices in by_size.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                grids = self._run(torch.stack([tensors[i] for i in chunk]))
                for i, grid in zip(chunk, grids, strict=True):
                    out[i] = np.ascontiguousarray(grid)
        return out  # type: ignore[return-value]

    def embed_one(self, image: np.ndarray) -> np.ndarray:
        return self.embed([image])[0]
