"""kNN features and FoundAD tokens from one backbone pass, with the kNN extractor's settings.

The backbone modules expose ``forward_with_foundad(x) -> (knn, foundad)`` (DINOv2: tokens after
the third-to-last block with the final LayerNorm; EfficientNet-Lite0: the raw stride-16
``blocks[4]`` map); the kNN output is bit-identical to ``forward(x)``. These helpers run it with
a :class:`~anomalydino_core.features.PatchFeatureExtractor`'s preprocessing, batching, device and
precision, so both methods read the same images through the same pass.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..features import PatchFeatureExtractor, to_input_tensor

Encode = Callable[[np.ndarray], np.ndarray]


def foundad_dim(extractor: PatchFeatureExtractor) -> int:
    """Width D of the FoundAD tokens of ``extractor``'s backbone."""
    return int(_module(extractor).foundad_dim)


def foundad_layer(extractor: PatchFeatureExtractor) -> str:
    """Which layer the FoundAD tokens of ``extractor``'s backbone come from (stored with every
    projector and token store, so that tokens of another layer are never mixed in)."""
    module = _module(extractor)
    from_end = getattr(module, "foundad_blocks_from_end", None)
    where = f"block -{from_end} + final norm" if from_end is not None else "its FoundAD layer"
    return f"{type(module).__name__}: {where}, {foundad_dim(extractor)} channels"


def _module(extractor: PatchFeatureExtractor) -> torch.nn.Module:
    module = extractor.module
    if not hasattr(module, "forward_with_foundad"):
        raise TypeError(f"backbone {extractor.backbone.identity.name} has no FoundAD layer")
    return module


@torch.inference_mode()
def _run_pair(extractor: PatchFeatureExtractor, batch: torch.Tensor) -> tuple[np.ndarray, ...]:
    module = _module(extractor)
    batch = batch.to(extractor.device, non_blocking=True)
    if extractor.channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    with torch.autocast(
        extractor.device.type, dtype=torch.bfloat16, enabled=extractor.precision == "bf16"
    ):
        knn, foundad = module.forward_with_foundad(batch)
    return knn.float().cpu().numpy(), foundad.float().cpu().numpy()


def embed_with_foundad(
    extractor: PatchFeatureExtractor, images: Sequence[np.ndarray]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """RGB uint8 images -> (kNN grids (gh, gw, C), FoundAD grids (gh, gw, D)), float32, in order.

    The kNN grids equal ``extractor.embed(images)`` bit for bit (same batching) when the
    extractor runs the torch module (runtime ``torch`` or ``vit_cpu``). With an exported runtime
    (OpenVINO, ONNX Runtime) ``embed`` runs the export, while this pass always runs the torch
    module, whose features agree with the export's within the runtimes' check (cosine >= 0.999
    per patch), not bit for bit: a run that scores FoundAD embeds its images through torch.
    """
    tensors = [to_input_tensor(img, extractor.preprocess) for img in images]
    by_size: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        by_size[tuple(t.shape)].append(i)
    knn: list[np.ndarray | None] = [None] * len(tensors)
    foundad: list[np.ndarray | None] = [None] * len(tensors)
    for indices in by_size.values():
        for start in range(0, len(indices), extractor.batch_size):
            chunk = indices[start : start + extractor.batch_size]
            grids, tokens = _run_pair(extractor, torch.stack([tensors[i] for i in chunk]))
            for j, i in enumerate(chunk):
                knn[i] = np.ascontiguousarray(grids[j])
                foundad[i] = np.ascontiguousarray(tokens[j])
    return knn, foundad  # type: ignore[return-value]


def foundad_encoder(extractor: PatchFeatureExtractor) -> Encode:
    """An ``encode(images (B, H, W, 3) uint8) -> tokens (B, gh, gw, D) float32`` for training."""
    _module(extractor)

    def encode(images: np.ndarray) -> np.ndarray:
        return np.stack(embed_with_foundad(extractor, list(images))[1])

    return encode
