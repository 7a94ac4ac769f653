"""Embedding speed per runtime: ms per image side by side, and the calibration's pick.

    python bench/embed.py [--backbones dinov2_vits14,efficientnet_lite0] [--resolution 448]
                          [--batch 8] [--precision auto] [--threads 2] [--rounds 5]
                          [--runtimes torch,vit_cpu,openvino,onnx] [--device cpu|cuda]

Prints the CPU (``lscpu`` model name, the amx_bf16 / avx512_bf16 flags), then per backbone every
runtime that can run it here: median and range of ms per image over ``--rounds`` interleaved
rounds (``anomalydino_core.runtimes.measure``; model time only, inputs are preprocessed tensors),
quiet and beside the pipeline's preprocessing on one thread (``tasks.runtimes.BESIDE_WORK``, as
the calibration measures), the least patch cosine to fp32 torch (OpenVINO also as
``openvino/<batch>``: the whole batch per inference request, and ``openvino/<n> streams``: one
image per request in n streams, the other request modes the calibration weighs; where the model
runs fp32, ``openvino int8w``: ``--precision int8``'s int8 weights, asked for, never calibrated
into ``auto``), and which runtime the pipeline's calibration picks (measured afresh into a
temporary cache, with its own figures: a second, shorter measurement).
DINOv2 runs with random weights (speed does not depend on the values). On CPU the batch is
capped as in the pipeline (``cpu_batch_size``: DINOv2 2, EfficientNet-Lite0 1). Exports are cached in
``$ANOMALYDINO_CACHE`` (first run: minutes of export per runtime and backbone).
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from anomalydino_core.config import ModelSettings
from anomalydino_core.runtimes import (
    PerShapeRunner,
    beside,
    fp32_reference,
    measure,
    patch_cosines,
    probe_batch,
)
from tasks.machine import cache_root, cpu_identity
from tasks.models import build_extractor, tune_allocator
from tasks.runtimes import (
    add_stream_variant,
    attach_runtime,
    build_runner,
    preprocessing_work,
    timed_calls,
    why_not,
)
from tasks.weights import load_backbone


def cpu_line() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(
            line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        name = str(cpu_identity()["model_name"])
    flags = [f for f in ("amx_bf16", "avx512_bf16") if f in cpu_identity()["flags"]]
    return f"CPU: {name}; flags: {' '.join(flags) or 'neither amx_bf16 nor avx512_bf16'}"


def bench_backbone(name: str, args: argparse.Namespace) -> None:
    weights = "random" if name.startswith("dinov2") else None
    backbone = load_backbone(name, weights=weights)
    model = ModelSettings(
        backbone=name,
        resolution=args.resolution,
        precision=args.precision,
        device=args.device,
        batch_size=args.batch,
        threads=args.threads,
        runtime="torch",
    )
    ex = build_extractor(model, backbone)
    size = ex.preprocess.resolution
    batch = probe_batch((size, size), batch=ex.batch_size)
    reference = fp32_reference(ex.module, batch)
    runners, notes = {}, {}
    for runtime in args.runtimes.split(","):
        why = why_not(ex, runtime)
        if why is not None:
            notes[runtime] = f"not here: {why}"
            continue
        runner = build_runner(ex, runtime, args.threads, cache_root())
        if (
            isinstance(runner, PerShapeRunner)
            and runner.runner_for((size, size)) is runner.fallback
        ):
            notes[runtime] = f"rejected: {runner.fallback_reasons[(size, size)]}"
            continue
        runners[runtime] = runner
    add_stream_variant(runners, ex, args.threads, cache_root(), notes)  # openvino/<n> streams
    if ex.precision == "fp32" and "openvino" in runners:
        add_int8_weights(runners, model, backbone, args.threads, notes)
    calls = timed_calls(runners, batch)  # OpenVINO also as openvino/<batch>
    cosines = {rt: float(patch_cosines(call(), reference).min()) for rt, call in calls.items()}
    result = measure(calls, images_per_call=batch.shape[0], rounds=args.rounds, min_seconds=0.0)
    with beside(preprocessing_work(ex)):
        loaded = measure(calls, images_per_call=batch.shape[0], rounds=args.rounds, min_seconds=0)
    under = {f.runtime: f for f in loaded.figures}
    print(f"\n{name} {size}x{size} batch {batch.shape[0]} {ex.precision} ({args.rounds} rounds)")
    w = max(11, *(len(f.runtime) + 1 for f in result.figures))
    print(f"  {'runtime':<{w}}{'quiet ms/img':>13}{'range':>13}{'beside ms/img':>15}{'range':>13}"
          f"{'cos vs fp32':>13}")  # fmt: skip
    for f in sorted(result.figures, key=lambda f: f.runtime):
        u = under[f.runtime]
        print(f"  {f.runtime:<{w}}{f.median_ms:>13.1f}{f'{f.min_ms:.1f}-{f.max_ms:.1f}':>13}"
              f"{u.median_ms:>15.1f}{f'{u.min_ms:.1f}-{u.max_ms:.1f}':>13}"
              f"{cosines[f.runtime]:>13.6f}")  # fmt: skip
    for runtime, note in notes.items():
        print(f"  {runtime:<{w}}{note}")
    with tempfile.TemporaryDirectory() as tmp:  # exports shared, the calibration fresh
        (Path(tmp) / "exports").symlink_to(cache_root() / "exports", target_is_directory=True)
        picked = attach_runtime(
            build_extractor(model, backbone), "auto", threads=args.threads, root=Path(tmp)
        )
    print(f"  calibration picks: {picked.text()}")


def add_int8_weights(runners: dict, model: ModelSettings, backbone, threads: int, notes) -> None:
    """``openvino int8w`` (and in streams): the same model with ``--precision int8``'s int8
    weights, where the model runs fp32 and nncf is installed."""
    settings = model.model_copy(update={"precision": "int8", "runtime": "openvino"})
    try:
        ex = build_extractor(settings, backbone)
    except ValueError as exc:  # nncf missing
        notes["openvino int8w"] = f"not here: {exc}"
        return
    int8: dict = {"openvino": ex.runner}
    add_stream_variant(int8, ex, threads, cache_root(), notes)
    for name, runner in int8.items():
        runners[name.replace("openvino", "openvino int8w", 1)] = runner


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backbones", default="dinov2_vits14,efficientnet_lite0")
    p.add_argument("--resolution", type=int, default=448)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--runtimes", default="torch,vit_cpu,openvino,onnx")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tune_allocator(args.device)  # as the pipeline does (ANOMALYDINO_MALLOC_TUNING=0: glibc's)
    print(cpu_line())
    print(f"{args.threads} threads, torch {torch.__version__}, numpy {np.__version__}")
    (cache_root() / "exports").mkdir(parents=True, exist_ok=True)
    for name in args.backbones.split(","):
        bench_backbone(name, args)


if __name__ == "__main__":
    main()
