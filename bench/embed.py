"""Embedding speed: ms per image (median of several runs) per backbone, precision and batch size.

    python bench/embed.py [--backbones dinov2_vits14,efficientnet_lite0] [--resolution 448]
                          [--batches 1,8] [--precisions fp32,bf16] [--threads 2] [--repeats 5]
                        [--device cpu|cuda|auto]

DINOv2 runs with random weights (the official ones cannot be downloaded here; speed does not
depend on the values). Model time only: inputs are preprocessed tensors already. The last line
of each backbone also prints preprocessing time (decode excluded) for one 900x900 image.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from anomalydino_core.features import PatchFeatureExtractor, select_device, to_input_tensor
from tasks.models import tune_allocator
from tasks.weights import load_backbone


def median_ms_per_image(ex: PatchFeatureExtractor, batch: torch.Tensor, repeats: int) -> float:
    ex._run(batch)  # warm-up (oneDNN kernel selection)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ex._run(batch)
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times) / batch.shape[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--backbones", default="dinov2_vits14,efficientnet_lite0")
    p.add_argument("--resolution", type=int, default=448)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (900, 900, 3), dtype=np.uint8)
    device = select_device(args.device)
    tune_allocator(device)  # as the pipeline does (ANOMALYDINO_MALLOC_TUNING=0: glibc's defaults)
    where = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"{args.threads} threads"
    )
    print(f"{where} resolution={args.resolution} torch={torch.__version__}")
    print(f"{'backbone':<20}{'precision':<10}{'batch':>6}{'ms/image':>10}{'images/s':>10}")
    for name in args.backbones.split(","):
        weights = "random" if name.startswith("dinov2") else None
        backbone = load_backbone(name, weights=weights)
        for precision in args.precisions.split(","):
            ex = PatchFeatureExtractor(
                backbone, resolution=args.resolution, precision=precision, device=str(device)
            )
            x = to_input_tensor(image, ex.preprocess)
            for bs in (int(b) for b in args.batches.split(",")):
                ms = median_ms_per_image(
                    ex, x[None].expand(bs, -1, -1, -1).contiguous(), args.repeats
                )
                print(f"{name:<20}{precision:<10}{bs:>6}{ms:>10.1f}{1000 / ms:>10.1f}", flush=True)
        t0 = time.perf_counter()
        for _ in range(5):
            to_input_tensor(image, ex.preprocess)
        print(
            f"{name:<20}preprocess 900x900 -> {ex.preprocess.input_size(image.shape[:2])}: "
            f"{1000 * (time.perf_counter() - t0) / 5:.1f} ms/image"
        )


if __name__ == "__main__":
    main()
