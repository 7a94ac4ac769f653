"""Peer benchmark: anomalib 2.7.0's AnomalyDINO ``Engine.predict`` vs this pipeline, end to end.

    python bench/peer.py [--shots 1,16] [--reps 2] [--test-images 83] [--threads 2]
                         [--resolution 448] [--rotation informed] [--precision auto]
                         [--venv .data/peer-venv]

1. A separate venv (default ``.data/peer-venv``, never a dependency of the project) with
   ``pip install torch==2.14.1 torchvision==0.29.1 anomalib==2.7.0`` (torch from the local
   wheel index), created on the first run.
2. Per configuration (shots), ``--reps`` pairs of runs, alternating which side goes first, each
   in a fresh process (its own peak RSS, read with ``os.wait4``):
   - anomalib: ``AnomalyDINO`` (``vit_small_patch14_dinov2``, random weights: ``timm.create_model``
     is patched to ``pretrained=False``), its pre-processor at ``resolution`` x ``resolution``,
     ``Engine.fit`` on ``bottle/train/good[:shots]``, then ``Engine.predict`` on the test images
     (timed: ms/img). Its maps are at the model's input size (``resolution``).
   - ours: as ``bench/pipeline.py`` (``dinov2_vits14``, random weights, ``model.threads``), the
     bank built (not timed), then the first run of the audit flow on the same test images
     (timed: the flow's own seconds per image): decoding, embedding, scoring, maps at the
     original resolution, overlays, report.
3. Prints ms/img, peak RSS of each, and the ratio anomalib / ours per configuration (medians).

Peak RSS includes file-backed pages (libraries, mapped model files), and how many of those a
process maps depends on the page cache: right after ``pip install`` wrote a venv, importing
torch mapped 422 MB of file pages instead of 225 (large page-cache folios; the same torch in the
two venvs, Intel Xeon). So before every run the page cache is dropped where this process may
(root: ``/proc/sys/vm/drop_caches``; printed), and both sides start from the same state.

Both sides use ``--threads`` threads. ``--test-images N`` uses the first N test images (sorted)
on both sides for a reduced run (ours then reads a temp copy of them, outside the repo).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEER_PACKAGES = ["torch==2.14.1", "torchvision==0.29.1", "anomalib==2.7.0"]


def ensure_venv(venv: Path) -> Path:
    """The peer venv's python, created and installed when missing."""
    python = venv / "bin" / "python"
    marker = venv / ".peer-installed"
    if marker.exists():
        return python
    print(f"creating {venv} ({' '.join(PEER_PACKAGES)}) ...", flush=True)
    base = shutil.which("python3.11") or shutil.which("python3") or sys.executable
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    marker.write_text(" ".join(PEER_PACKAGES) + "\n")
    return python


def link_images(data: Path, shots: int, n_test: int, root: Path) -> tuple[Path, Path]:
    """Symlinks: train/good[:shots] -> root/train, the first n_test test images -> root/test."""
    train, test = root / "train", root / "test"
    train.mkdir(parents=True)
    test.mkdir(parents=True)
    for path in sorted((data / "train" / "good").glob("*.png"))[:shots]:
        (train / path.name).symlink_to(path)
    for path in sorted((data / "test").glob("*/*.png"))[:n_test]:
        (test / f"{path.parent.name}_{path.name}").symlink_to(path)
    return train, test


def drop_page_cache() -> bool:
    """Write back and drop the clean page cache (root only); False where not permitted."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("1\n")
        return True
    except OSError:
        return False


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[str, int, float]:
    """Run a command; (stdout, peak RSS bytes of that process, wall seconds)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # reaps it: its own rusage
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode:
        sys.exit(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}):\n{stderr[-3000:]}")
    return stdout, usage.ru_maxrss * 1024, wall


# ------------------------------------------------------------------------------ anomalib side


def rss_split() -> dict[str, int]:
    """This process's resident memory now, anonymous and file-backed (bytes): file pages
    (libraries, mapped model files) are clean and the kernel can take them back."""
    split = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("RssAnon:", "RssFile:")):
                split[line.split(":")[0].lower()] = int(line.split()[1]) * 1024
    return split


def anomalib_worker(args: argparse.Namespace) -> None:
    """Runs inside the peer venv: fit + predict, prints one JSON line."""
    import resource

    import timm
    import torch

    torch.set_num_threads(args.threads)
    create_model = timm.create_model

    def no_download(name, *a, pretrained=False, **kw):  # DINOv2 weights cannot be fetched
        if "dinov2" in str(name):
            pretrained = False
        return create_model(name, *a, pretrained=pretrained, **kw)

    timm.create_model = no_download
    from anomalib.data import PredictDataset
    from anomalib.engine import Engine
    from anomalib.models import AnomalyDINO
    from torch.utils.data import DataLoader

    size = (args.resolution, args.resolution)
    model = AnomalyDINO(
        encoder_name="vit_small_patch14_dinov2",
        pre_processor=AnomalyDINO.configure_pre_processor(image_size=size),
        evaluator=False,
        visualizer=False,
    )
    engine = Engine(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        default_root_dir=args.work,
    )
    train = PredictDataset(args.train, image_size=size)
    loader = DataLoader(train, batch_size=1, collate_fn=train.collate_fn)
    t0 = time.perf_counter()
    engine.fit(model=model, train_dataloaders=loader)
    fit_s = time.perf_counter() - t0
    test = PredictDataset(args.test, image_size=size)
    test_loader = DataLoader(test, batch_size=1, collate_fn=test.collate_fn)
    t0 = time.perf_counter()
    preds = engine.predict(model=model, dataloaders=test_loader, return_predictions=True)
    seconds = time.perf_counter() - t0
    n = sum(len(p.pred_score) for p in preds)
    bank = int(model.model.memory_bank.shape[0])
    print(
        json.dumps(
            {
                "n": n,
                "seconds": seconds,
                "fit_s": fit_s,
                "bank": bank,
                "map": list(preds[0].anomaly_map.shape[-2:]),
                "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                **rss_split(),
            }
        )
    )


def run_anomalib(python: Path, train: Path, test: Path, work: Path, args) -> dict:
    cmd = [str(python), __file__, "--anomalib-worker", "--train", str(train), "--test", str(test)]
    cmd += ["--work", str(work), "--threads", str(args.threads)]
    cmd += ["--resolution", str(args.resolution)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    out, rss, wall = run_measured(cmd, env)
    r = json.loads(out.strip().splitlines()[-1])
    r |= {"ms_per_image": 1e3 * r["seconds"] / r["n"], "peak_rss_wait4": rss, "wall": wall}
    return r


# ---------------------------------------------------------------------------------- our side


def ours_worker(args: argparse.Namespace) -> None:
    """Runs in the project's venv: bench/pipeline.py's setup (references linked as bank v1, the
    test images as one lot), the bank built (not timed), then the audit's first run (timed)."""
    from worker_env import command_server, prepare_process

    prepare_process()
    import resource

    from flows.audit import audit_lot
    from flows.build_bank import build_bank
    from flows.config import PipelineConfig
    from flows.demo import setup_demo
    from flows.runtime import with_runner

    data = Path(args.mvtec)
    root = Path(args.work)
    setup_demo(root, data, "bottle", args.n_shots, "lot-peer")
    cfg = PipelineConfig.load(
        environ={},
        overrides={
            "root": str(root),
            "model": {
                "backbone": "dinov2_vits14",
                "weights": "random",
                "resolution": args.resolution,
                "threads": args.threads,
                "precision": args.precision,
            },
            "products": {"bottle": {"rotation": args.rotation}},
            "storage": {"link_roots": [str(data.resolve() / "bottle")]},
        },
    )
    with command_server():
        bank = build_bank("bottle", config=cfg)
        summary = with_runner(audit_lot, cfg.runtime)("bottle", "lot-peer", cfg)
    print(
        json.dumps(
            {
                "n": summary.n_images,
                "seconds": summary.seconds,
                "bank": int(bank.bank_patches),
                "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                **rss_split(),
            }
        )
    )


def run_ours(data_root: Path, shots: int, test: Path, args) -> dict:
    """Our first run on the same test images, in a fresh process (``ours_worker``): on the MVTec
    folder itself for all of them, else on a temp MVTec-layout copy (outside the repo) of the
    references and the subset (the pipeline follows links only into its link roots)."""
    with tempfile.TemporaryDirectory(prefix="peer-ours-") as tmp:
        mvtec = data_root.parent
        if len(list(test.iterdir())) < len(list((data_root / "test").glob("*/*.png"))):
            mvtec = Path(tmp) / "mvtec"
            good, lot = mvtec / "bottle" / "train" / "good", mvtec / "bottle" / "test" / "lot"
            good.mkdir(parents=True)
            lot.mkdir(parents=True)
            for path in sorted((data_root / "train" / "good").glob("*.png"))[:shots]:
                shutil.copy(path, good / path.name)
            for link in sorted(test.iterdir()):
                shutil.copy(link.resolve(), lot / link.name)
        cmd = [sys.executable, __file__, "--ours-worker", "--mvtec", str(mvtec)]
        cmd += ["--work", str(Path(tmp) / "root"), "--n-shots", str(shots)]
        cmd += ["--resolution", str(args.resolution), "--threads", str(args.threads)]
        cmd += ["--rotation", args.rotation, "--precision", args.precision]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        out, rss, wall = run_measured(cmd, env)
    r = json.loads(out.strip().splitlines()[-1])
    r |= {"ms_per_image": 1e3 * r["seconds"] / r["n"], "peak_rss_wait4": rss, "wall": wall}
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "mvtec_ad"))
    p.add_argument("--shots", default="1,16")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--test-images", type=int, default=83)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resolution", type=int, default=448)
    p.add_argument("--rotation", choices=["informed", "agnostic"], default="informed")
    p.add_argument("--precision", default="auto", help="ours: model.precision (auto, int8...)")
    p.add_argument("--venv", default=str(REPO / ".data" / "peer-venv"))
    p.add_argument("--anomalib-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ours-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mvtec", help=argparse.SUPPRESS)
    p.add_argument("--n-shots", type=int, help=argparse.SUPPRESS)
    p.add_argument("--train", help=argparse.SUPPRESS)
    p.add_argument("--test", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.anomalib_worker:
        anomalib_worker(args)
        return
    if args.ours_worker:
        ours_worker(args)
        return

    python = ensure_venv(Path(args.venv))
    data = Path(args.data).resolve() / "bottle"
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model = next(
        (ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if "Model name" in ln), "?"
    )
    print(f"CPU: {model}; threads={args.threads}; {args.test_images} test images at "
          f"{args.resolution}; ours: rotation {args.rotation}", flush=True)  # fmt: skip
    gib = 2**30
    summary = []
    for shots in (int(s) for s in args.shots.split(",")):
        runs: dict[str, list[dict]] = {"anomalib": [], "ours": []}
        with tempfile.TemporaryDirectory(prefix="peer-") as tmp:
            train, test = link_images(data, shots, args.test_images, Path(tmp))
            for rep in range(args.reps):
                order = ["anomalib", "ours"] if rep % 2 == 0 else ["ours", "anomalib"]
                for side in order:
                    dropped = drop_page_cache()
                    if side == "anomalib":
                        work = Path(tmp) / f"work{rep}"
                        r = run_anomalib(python, train, test, work, args)
                    else:
                        r = run_ours(data, shots, test, args)
                    runs[side].append(r)
                    print(
                        f"{shots:>2}-shot rep {rep} {side:<9} {r['ms_per_image']:8.1f} ms/img "
                        f"({r['n']} images, bank {r['bank']}), peak RSS "
                        f"{r['peak_rss_wait4'] / gib:.2f} GiB (at the end: anonymous "
                        f"{r['rssanon'] / gib:.2f}, file {r['rssfile'] / gib:.2f}), process "
                        f"{r['wall']:.0f} s{'' if dropped else ' (page cache not dropped)'}",
                        flush=True,
                    )
        med = {s: statistics.median(x["ms_per_image"] for x in v) for s, v in runs.items()}
        rss = {s: max(x["peak_rss_wait4"] for x in v) for s, v in runs.items()}
        summary.append((shots, med, rss))
    print(f"\n{'shots':>5}{'anomalib ms/img':>17}{'ours ms/img':>13}{'ratio a/o':>11}"
          f"{'anomalib RSS':>14}{'ours RSS':>10}")  # fmt: skip
    for shots, med, rss in summary:
        print(
            f"{shots:>5}{med['anomalib']:>17.1f}{med['ours']:>13.1f}"
            f"{med['anomalib'] / med['ours']:>11.2f}{rss['anomalib'] / gib:>12.2f} G"
            f"{rss['ours'] / gib:>8.2f} G"
        )


if __name__ == "__main__":
    main()
