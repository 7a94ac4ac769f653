"""Benchmark of batched zero-shot mutual scoring (anomalydino_core.zero_shot, mutual_topk).

Features have the geometry of dinov2_vits14 at 448 (32 x 32 = 1024 patches x 384 dims, float16).
Every N runs in a fresh subprocess so that its peak RSS (ru_maxrss) is its own.

    .venv/bin/python bench/zero_shot.py --n 83,200,400 --budget-gb 2 --precision bf16
    .venv/bin/python bench/zero_shot.py --n 83 --queries 8          # quick: 8 of 83 images
    .venv/bin/python bench/zero_shot.py --n 83 --compare --queries 8  # bf16 vs fp32 errors

``--data random``: i.i.d. Gaussian features. ``--data structured``: DINO-like features, a smooth
per-location pattern shared by all images, a common offset, per-image shifts and noise, and a few
anomalous blobs, so that the k nearest distances are small (0.1-0.4) and clustered.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

GRID, DIM = 32, 384


def make_features(n: int, data: str, seed: int = 0) -> list[np.ndarray]:
    """N float16 grids (32, 32, 384)."""
    rng = np.random.default_rng(seed)
    if data == "random":
        return [
            rng.standard_normal((GRID, GRID, DIM), dtype=np.float32).astype(np.float16)
            for _ in range(n)
        ]
    # a smooth pattern over a padded grid (shifts up to 2 patches), plus a common offset
    pad = GRID + 4
    coarse = rng.standard_normal((pad // 4 + 2, pad // 4 + 2, DIM), dtype=np.float32)
    yy = np.linspace(0, coarse.shape[0] - 1.001, pad)
    y0 = yy.astype(int)
    fy = (yy - y0)[:, None, None]
    rows = coarse[y0] * (1 - fy) + coarse[y0 + 1] * fy
    xx = yy
    x0 = xx.astype(int)
    fx = (xx - x0)[None, :, None]
    pattern = rows[:, x0] * (1 - fx) + rows[:, x0 + 1] * fx
    pattern += 1.2 * rng.standard_normal(DIM, dtype=np.float32)
    grids = []
    for i in range(n):
        dy, dx = rng.integers(0, 5, size=2)
        g = pattern[dy : dy + GRID, dx : dx + GRID] * rng.uniform(0.9, 1.1)
        g = g + 0.5 * rng.standard_normal((GRID, GRID, DIM), dtype=np.float32)
        if i % 10 == 3:  # an anomalous blob
            cy, cx = rng.integers(4, GRID - 4, size=2)
            g[cy - 2 : cy + 3, cx - 2 : cx + 3] += 1.5 * rng.standard_normal(DIM, dtype=np.float32)
        grids.append(g.astype(np.float16))
    return grids


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def worker(args: argparse.Namespace) -> dict:
    import torch

    from anomalydino_core import zero_shot
    from anomalydino_core.mutual_topk import budget_side, tail_size
    from anomalydino_core.zero_shot import MutualScoringConfig, score_mutual

    torch.set_num_threads(args.threads)
    n = int(args.n)
    grids = make_features(n, args.data)
    feature_bytes = sum(g.nbytes for g in grids)
    rss_before = peak_rss_bytes()
    queries = list(range(min(args.queries, n) if args.queries else n))
    budget = int(args.budget_gb * 2**30)
    config = MutualScoringConfig(precision=args.precision, memory_budget_bytes=budget)
    cpu0, t0 = time.process_time(), time.perf_counter()
    results = score_mutual(grids, query_indices=queries, config=config)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    out = {
        "n": n,
        "queries": len(queries),
        "precision": args.precision,
        "data": args.data,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "ms_per_image": 1e3 * seconds / len(queries),
        "peak_rss": peak_rss_bytes(),
        "rss_before": rss_before,
        "feature_bytes": feature_bytes,
        "budget": budget,
        "mean_score": float(np.mean([r.score for r in results])),
    }
    k = tail_size("code_mean", config.alpha, (n - 1) * GRID * GRID)
    side = budget_side(args.precision, budget, k)
    total = n * GRID * GRID
    out["tile"] = list(zero_shot.tuned_tile(args.precision, DIM, k, total, side))  # cached
    if args.compare:
        reference = score_mutual(
            grids,
            query_indices=queries,
            config=MutualScoringConfig(precision="fp32", memory_budget_bytes=budget),
        )
        rel = [
            abs(a.score - b.score) / abs(b.score) for a, b in zip(results, reference, strict=True)
        ]
        patch_abs = [
            np.abs(a.patch_scores - b.patch_scores).max()
            for a, b in zip(results, reference, strict=True)
        ]
        patch_rel = [
            (np.abs(a.patch_scores - b.patch_scores) / np.maximum(b.patch_scores, 1e-6)).max()
            for a, b in zip(results, reference, strict=True)
        ]
        out["compare"] = {
            "score_rel_max": float(np.max(rel)),
            "score_rel_mean": float(np.mean(rel)),
            "patch_abs_max": float(np.max(patch_abs)),
            "patch_rel_max": float(np.max(patch_rel)),
            "fp32_mean_score": float(np.mean([r.score for r in reference])),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", default="83,200,400", help="comma-separated batch sizes")
    parser.add_argument("--budget-gb", type=float, default=2.0)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--data", choices=["random", "structured"], default="random")
    parser.add_argument("--queries", type=int, default=0, help="score only the first Q images")
    parser.add_argument("--compare", action="store_true", help="also fp32: report bf16 errors")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker(args)))
        return

    root = Path(__file__).resolve().parent.parent
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if "Model" in ln), "?")
    print(f"CPU: {model}; threads={args.threads}", flush=True)
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rows = []
    for n in [int(x) for x in args.n.split(",")]:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            "--n",
            str(n),
            "--budget-gb",
            str(args.budget_gb),
            "--precision",
            args.precision,
            "--data",
            args.data,
            "--queries",
            str(args.queries),
            "--threads",
            str(args.threads),
        ]
        if args.compare:
            cmd.append("--compare")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode:
            sys.exit(f"N={n} failed:\n{proc.stderr}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(r)
        gib = 2**30
        limit = r["budget"] + r["feature_bytes"]
        print(
            f"N={n:4d} ({r['queries']} scored, {r['precision']}, {r['data']}): "
            f"{r['ms_per_image']:7.1f} ms/img, total {r['seconds']:7.2f} s "
            f"(cpu {r['cpu_seconds']:.1f} s) | peak RSS {r['peak_rss'] / gib:.2f} GiB "
            f"(before scoring {r['rss_before'] / gib:.2f}), features "
            f"{r['feature_bytes'] / gib:.3f} GiB, budget {r['budget'] / gib:.2f} GiB | "
            f"peak < budget + features: {r['peak_rss'] < limit}; scoring's own growth "
            f"{(r['peak_rss'] - r['rss_before']) / gib:.2f} GiB < budget: "
            f"{r['peak_rss'] - r['rss_before'] < r['budget']} | measured tile "
            f"{r['tile'][1]} ({r['tile'][0]})",
            flush=True,
        )
        if "compare" in r:
            c = r["compare"]
            print(
                f"    bf16 vs fp32: image score rel. error max {c['score_rel_max']:.2e} "
                f"mean {c['score_rel_mean']:.2e}; patch score abs. error max "
                f"{c['patch_abs_max']:.2e}, rel. max {c['patch_rel_max']:.2e} "
                f"(mean fp32 score {c['fp32_mean_score']:.4f})"
            )
    if len(rows) > 1:
        base = rows[0]
        for r in rows[1:]:
            ratio = (r["seconds"] / r["queries"]) / (base["seconds"] / base["queries"])
            print(
                f"N {base['n']} -> {r['n']}: time per image x{ratio:.2f} "
                f"(bank size x{r['n'] / base['n']:.2f}; total time grows ~N^2)"
            )


if __name__ == "__main__":
    main()
