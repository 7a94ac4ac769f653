"""What the HTML lot page costs, on the demo lot (MVTec bottle/test, 83 images, ~65 flagged).

    python bench/lot_report.py [--backbone auto] [--resolution 448] [--repeats 3] [--root DIR]

1. The demo's audit under a fresh root, twice: the first run embeds everything, the re-run
   reuses every embedding. Each run writes its page (``flows/run.py finish_run``); the page's
   time inside the run is compared with the flow's time (target: under 10%).
2. In this same process, on the first run's report, the page written three ways (median of
   ``--repeats``):
   - ``before``: what the renderer did first, every flagged image's full-size source PNG and
     overlay PNG decoded (the report's metadata without ``thumbs_uri`` and ``maps_uri``);
   - ``no thumbnails``: the source PNG decoded, the overlay blended from the downscaled map;
   - ``after``: the run's stored image and overlay thumbnails copied (the overlay blended from
     the image thumbnail and the map only where a run stored none).
3. The thumbnails' own cost inside the scoring task (resize + JPEG + write of an image that is
   decoded anyway), per flagged image.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for key, value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "ANOMALYDINO_PROGRESS": "off",
}.items():
    os.environ.setdefault(key, value)


def cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        name = info.get("Model name", platform.processor()).strip()
    except (OSError, subprocess.CalledProcessError):
        name = platform.processor() or "unknown CPU"
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return f"{name}, {os.cpu_count()} logical CPUs visible, load average {load}"


def variant(report: str, folder: Path, drop: tuple[str, ...]) -> str:
    """A copy of ``report`` in ``folder`` whose metadata lacks the keys ``drop``."""
    import pyarrow.parquet as pq

    table = pq.read_table(report)
    meta = json.loads(table.schema.metadata[b"anomalydino"])
    for k in drop:
        meta.pop(k, None)
    out = folder / "-".join(drop or ("after",)) / Path(report).name
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        table.replace_schema_metadata(
            {**table.schema.metadata, b"anomalydino": json.dumps(meta).encode()}
        ),
        out,
    )
    return str(out)


def timed(fn, repeats: int) -> tuple[float, float]:
    """(median wall seconds, median process CPU seconds) of ``fn()``."""
    wall, cpu_s = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu_s.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu_s)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "mvtec_ad"))
    p.add_argument("--backbone", default="auto")
    p.add_argument("--resolution", type=int, default=448)
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--root", default=None, help="default: a temp dir, removed at the end")
    args = p.parse_args()

    from anomalydino_core.images import decode_image
    from flows.audit import audit_lot
    from flows.config import PipelineConfig
    from flows.demo import setup_demo
    from flows.runtime import with_runner
    from tasks.lot_report import write_lot_report
    from tasks.report import read_report
    from tasks.thumbnails import write_thumbnail

    root = Path(args.root or tempfile.mkdtemp(prefix="anomalydino-bench-")).resolve()
    setup_demo(root, Path(args.data), "bottle", args.shots, "lot-0001")
    cfg = PipelineConfig.load(
        environ={},
        overrides={
            "root": str(root),
            "model": {"backbone": args.backbone, "resolution": args.resolution},
            "products": {"bottle": {"rotation": "informed"}},
            "storage": {"link_roots": [str(Path(args.data).resolve() / "bottle")]},
        },
    )
    try:
        runs = []
        for label in ("first run", "re-run"):
            s = with_runner(audit_lot, cfg.runtime)("bottle", "lot-0001", cfg)
            runs.append((label, s))
        report = runs[0][1].report_uri
        df = read_report(report)
        flagged = df[df["verdict"] == "anomalous"]
        work = root / "bench-variants"
        cases = [
            ("before (full PNGs)", variant(report, work, ("thumbs_uri", "maps_uri"))),
            ("no thumbnails", variant(report, work, ("thumbs_uri",))),
            ("after", variant(report, work, ())),
        ]
        for _, uri in cases:  # warm: templates compiled, files cached
            write_lot_report(uri)
        results = [(label, *timed(lambda u=uri: write_lot_report(u), args.repeats))
                   for label, uri in cases]  # fmt: skip
        images = [decode_image(Path(u).read_bytes(), u) for u in flagged["image_uri"]]
        thumbs = root / "bench-thumbs"
        thumb_wall, thumb_cpu = timed(
            lambda: [write_thumbnail(str(thumbs), str(i), im, None) for i, im in enumerate(images)],
            args.repeats,
        )
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)

    n = len(flagged)
    print(f"\nCPU: {cpu()}")
    print(f"demo lot: {len(df)} images, {n} flagged, {cfg.model.backbone} at {args.resolution}")
    print("\nthe page inside the run (flows/run.py finish_run)")
    print(f"{'':<12}{'flow s':>8}{'page s':>8}{'share':>8}")
    for label, s in runs:
        share = (s.page_seconds or 0) / s.seconds
        print(f"{label:<12}{s.seconds:>8.2f}{s.page_seconds or 0:>8.2f}{100 * share:>7.1f}%")
    first = runs[0][1].seconds
    print(f"\nthe page of the first run, rebuilt in this process (median of {args.repeats})")
    print(f"{'':<22}{'wall s':>8}{'CPU s':>8}{'CPU ms/flagged':>16}{'% of first run':>16}")
    for label, wall, cpu_s in results:
        print(f"{label:<22}{wall:>8.2f}{cpu_s:>8.2f}{1000 * cpu_s / max(n, 1):>16.1f}"
              f"{100 * wall / first:>15.1f}%")  # fmt: skip
    print(f"{'thumbnails (scoring)':<22}{thumb_wall:>8.2f}{thumb_cpu:>8.2f}"
          f"{1000 * thumb_cpu / max(n, 1):>16.1f}{100 * thumb_wall / first:>15.1f}%  "
          f"(in the scoring task's I/O pool, not on the page's path)")  # fmt: skip


if __name__ == "__main__":
    main()
