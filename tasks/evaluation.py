"""The evaluation's I/O: list and decode an MVTec-layout category, load the backbone, run the
protocol (``anomalydino_core.evaluation.evaluate_category``), write metrics.parquet/metrics.md."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pandas as pd
import psutil
import torch

from anomalydino_core.cpu import set_threads
from anomalydino_core.evaluation import (
    EvaluationRequest,
    Log,
    StartProgress,
    evaluate_category,
    preprocess_plan,
    summary_table,
)
from tasks.datasets import load_mvtec_category, read_test_split
from tasks.image_files import read_image
from tasks.models import build_extractor
from tasks.weights import RemoteFetcher, load_backbone

T = TypeVar("T")


def run_evaluation(
    request: EvaluationRequest,
    log: Log | None = None,
    fetch_remote: RemoteFetcher | None = None,
    start_progress: StartProgress | None = None,
) -> pd.DataFrame:
    """Evaluate one category; returns one row per shots x seed with every metric.

    ``fetch_remote`` downloads weights given as a URI (``tasks.models.remote_fetcher``).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    category = load_mvtec_category(request.data, request.category)
    model = request.model
    preprocess_plan(request.preprocess, category.name, request.scoring.masking)  # fail early
    set_threads(model.threads or torch.get_num_threads())

    backbone = load_backbone(model.backbone, weights=model.weights, fetch_remote=fetch_remote)
    if model.backbone == "auto":
        log(
            f"backbone=auto resolved to {backbone.identity.name} ({backbone.identity.weights_source})"
        )
    extractor = build_extractor(model, backbone)
    log(
        f"{category.name}: {len(category.test)} test images, {len(category.train_good)} train/good; "
        f"backbone {backbone.identity.name}, precision {extractor.precision}, "
        f"{model.resolution}px, preprocess {request.preprocess}"
    )
    test = read_test_split(category, log)
    return evaluate_category(
        request,
        category,
        test,
        extractor,
        read_image,
        log,
        measure=peak_rss_during,
        start_progress=start_progress,
    )


def peak_rss_during(fn: Callable[[], T]) -> tuple[T, float]:
    """(fn(), the peak resident memory of this process in GiB while fn ran), sampled every
    20 ms by a thread (``ru_maxrss`` only knows the whole process's lifetime peak)."""
    process = psutil.Process()
    peak = process.memory_info().rss
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.02):
            peak = max(peak, process.memory_info().rss)

    sampler = threading.Thread(target=sample, name="peak-rss", daemon=True)
    sampler.start()
    try:
        result = fn()
    finally:
        done.set()
        sampler.join()
    return result, max(peak, process.memory_info().rss) / 2**30


def write_outputs(df: pd.DataFrame, out_dir: str | Path) -> tuple[Path, Path, str]:
    """Write metrics.parquet and metrics.md atomically; returns their paths and the table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = summary_table(df)
    parquet, md = out / "metrics.parquet", out / "metrics.md"
    tmp_p, tmp_m = out / ".metrics.parquet.tmp", out / ".metrics.md.tmp"
    df.to_parquet(tmp_p, index=False)
    tmp_m.write_text(table + "\n")
    tmp_p.replace(parquet)
    tmp_m.replace(md)
    return parquet, md, table
