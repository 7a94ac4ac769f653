"""End-to-end pipeline throughput: the audit flow on the MVTec bottle lot (83 images) vs the model.

    python bench/pipeline.py [--backbone auto] [--weights W] [--resolution 448] [--shots 4]
                             [--precision auto] [--rotation informed] [--batch-size 1] [--threads 2]
                             [--concurrency 2] [--chunk-size 16] [--index exact_bf16]
                             [--root DIR]

1. Links (never copies) bottle/train/good[:shots] as reference version v1 and bottle/test as one
   lot under a fresh root, and builds the bank (not timed: a bank is built once per version).
2. First run: the audit flow embeds, scores, writes maps, overlays and the report.
3. Re-run: the same lot again; every embedding is reused.
4. Model only: the forward pass of the same extractor (its runtime), same settings
   (preprocessed tensors, no decoding, no I/O), measured right before the first run and right
   after the re-run: a shared machine drifts by 10-20% between minutes, so the ratio uses the
   mean of the two and both are printed.

Prints images/s of each and the ratio pipeline / model (target >= 0.75 on the first run). Time of
a run = the flow's own wall time (from its start to the report written, model already loaded);
``call`` adds Prefect's flow-run bookkeeping around it.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from worker_env import REPO, command_server, prepare_process

prepare_process()


def cpu_seconds() -> float:
    """CPU time of this process so far, all threads, user + system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


MODEL_CPU: list[float] = []  # CPU seconds per image of each model-only measurement


def median_ms_per_image(extractor, batch, repeats: int) -> float:
    """Median forward time per image of ``extractor``'s runtime on a preprocessed batch."""
    extractor._run(batch)  # warm-up (kernel selection; an export's first call)
    times = []
    cpu0 = cpu_seconds()
    for _ in range(repeats):
        t0 = time.perf_counter()
        extractor._run(batch)
        times.append(time.perf_counter() - t0)
    MODEL_CPU.append((cpu_seconds() - cpu0) / (repeats * batch.shape[0]))
    return 1000.0 * float(np.median(times)) / batch.shape[0]


def model_only_images_per_s(model_settings, threads: int, repeats: int) -> tuple[float, str]:
    """bench/embed.py's median forward time at the pipeline's settings, on a 900x900 input."""
    import torch

    from anomalydino_core.features import to_input_tensor
    from tasks.models import embedder, pin_threads

    pin_threads(threads)
    ex = embedder(model_settings).extractor
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (900, 900, 3), dtype=np.uint8)
    x = to_input_tensor(image, ex.preprocess)
    bs = ex.batch_size
    ms = median_ms_per_image(ex, x[None].expand(bs, -1, -1, -1).contiguous(), repeats)
    torch.set_num_threads(threads)
    return 1000.0 / ms, f"{ex.backbone.identity.name} {ex.precision} {ex.runtime} batch {bs}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "mvtec_ad"))
    p.add_argument("--backbone", default="auto")
    p.add_argument("--weights", default=None, help="e.g. 'random' for DINOv2 speed tests")
    p.add_argument("--resolution", type=int, default=448)
    p.add_argument("--precision", default="auto", help="model.precision (auto, fp32, bf16, int8)")
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--rotation", choices=["agnostic", "informed"], default="informed")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=None, help="default: the config's")
    p.add_argument("--index", default=None, help="scoring.index (default: the config's, exact)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--root", default=None, help="default: a temp dir, removed at the end")
    args = p.parse_args()

    from flows.audit import audit_lot
    from flows.build_bank import build_bank
    from flows.config import PipelineConfig
    from flows.demo import setup_demo
    from flows.runtime import with_runner

    root = Path(args.root or tempfile.mkdtemp(prefix="anomalydino-bench-")).resolve()
    setup_demo(root, Path(args.data), "bottle", args.shots, "lot-bench")
    cfg = PipelineConfig.load(
        environ={},
        overrides={
            "root": str(root),
            "model": {
                "backbone": args.backbone,
                "weights": args.weights,
                "resolution": args.resolution,
                "batch_size": args.batch_size,
                "threads": args.threads,
                "precision": args.precision,
            },
            "runtime": {"concurrency": args.concurrency}
            | ({"chunk_size": args.chunk_size} if args.chunk_size else {}),
            "products": {"bottle": {"rotation": args.rotation}},
            "scoring": {"index": args.index} if args.index else {},
            # the references are links into the MVTec folder (setup_demo)
            "storage": {"link_roots": [str(Path(args.data).resolve() / "bottle")]},
        },
    )
    try:
        with command_server():
            t0 = time.perf_counter()
            bank = build_bank("bottle", config=cfg)
            print(
                f"bank: {len(bank.references)} references x {len(bank.angles)} views, "
                f"{bank.bank_patches} patches, built in {time.perf_counter() - t0:.1f}s "
                f"(incl. model load)",
                flush=True,
            )
            model_before, what = model_only_images_per_s(cfg.model, args.threads, args.repeats)
            runs = []
            for label in ("first run", "re-run"):
                t0, cpu0 = time.perf_counter(), cpu_seconds()
                s = with_runner(audit_lot, cfg.runtime)("bottle", "lot-bench", cfg)
                call = time.perf_counter() - t0
                runs.append((label, s, call, cpu_seconds() - cpu0))
            model_after, _ = model_only_images_per_s(cfg.model, args.threads, args.repeats)
            model_ips = (model_before + model_after) / 2
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)

    print(
        f"\nbottle lot, {args.resolution}px, {what}, {args.threads} threads, "
        f"{args.shots} shots ({args.rotation}), runner concurrency {args.concurrency}"
    )
    print(f"{'':<12}{'images':>7}{'computed':>9}{'reused':>7}{'flow s':>8}{'img/s':>7}"
          f"{'call s':>8}{'ratio':>7}{'cpu ms/img':>11}")  # fmt: skip
    for label, s, call, cpu in runs:
        ips = s.n_images / s.seconds
        print(
            f"{label:<12}{s.n_images:>7}{s.n_computed:>9}{s.n_reused:>7}{s.seconds:>8.2f}"
            f"{ips:>7.1f}{call:>8.2f}{ips / model_ips:>7.2f}{1000 * cpu / s.n_images:>11.0f}"
        )
    model_cpu = 1000 * float(np.mean(MODEL_CPU))
    print(f"{'model only':<12}{'':>31}{model_ips:>7.1f}{'':>15}{model_cpu:>11.0f}   (before "
          f"{model_before:.1f}, after {model_after:.1f} img/s)")  # fmt: skip
    print("cpu ms/img: CPU time of all threads (the call's, incl. Prefect) per image")
    first = runs[0][1]
    ratio = first.n_images / first.seconds / model_ips
    print(f"\nfirst-run ratio pipeline/model = {ratio:.2f} (target >= 0.75)")
    print(f"re-run speed-up = {first.seconds / runs[1][1].seconds:.1f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
