"""``anomalydino demo``: the nightly audit end to end on one MVTec category, on local files (or
S3 with ``--s3``), with embedded defaults; prints where everything is and, as a sanity check
only, how the verdicts compare with the folder labels (which the pipeline never reads)."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from flows.commands import REPO, _quiet, load_config
from flows.exits import outcome


def setup_demo(root: Path, data: Path, category: str, shots: int, lot: str) -> tuple[Path, Path]:
    """Link (never copy) the MVTec category into the pipeline layout under ``root``:
    references/<category>/v1 = the first ``shots`` train/good images, incoming/<category>/<lot> =
    its test/ folder. Returns (references dir, lot dir)."""
    src = data / category
    train, test = src / "train" / "good", src / "test"
    if not train.is_dir() or not test.is_dir():
        raise FileNotFoundError(f"{src}: expected train/good and test/ (MVTec layout)")
    refs = root / "references" / category / "v1"
    refs.mkdir(parents=True, exist_ok=True)
    wanted = sorted(p for p in train.iterdir() if p.suffix.lower() == ".png")[:shots]
    for old in refs.iterdir():
        if old.is_symlink() and old.name not in {p.name for p in wanted}:
            old.unlink()
    for p in wanted:
        link = refs / p.name
        if not link.exists():
            link.symlink_to(p.resolve())
    lot_dir = root / "incoming" / category / lot
    lot_dir.parent.mkdir(parents=True, exist_ok=True)
    if not lot_dir.exists():
        lot_dir.symlink_to(test.resolve(), target_is_directory=True)
    return refs, lot_dir


def page_location(html_uri: str) -> str:
    """A local page as a ``file://`` URI (clickable in a terminal), an S3 one as it is."""
    from tasks.storage import is_local, local_path

    return local_path(html_uri).as_uri() if is_local(html_uri) else html_uri


def label_check(report_uri: str) -> str:
    """How the verdicts compare with the MVTec folder labels (which the pipeline never reads)."""
    import pandas as pd

    from anomalydino_core.metrics import image_metrics

    df = pd.read_parquet(report_uri)
    df = df[df["error"].isna()]
    if df.empty:
        return "no scored images"
    defective = ~df["image_id"].str.startswith("good/")
    flagged = df["is_anomalous"].astype(bool)
    auroc = image_metrics(df["score"].to_numpy(), defective.to_numpy().astype(int)).auroc
    return (
        f"check against the MVTec labels (not used by the pipeline): flagged "
        f"{int((flagged & defective).sum())}/{int(defective.sum())} defective, "
        f"{int((flagged & ~defective).sum())}/{int((~defective).sum())} good; "
        f"image AUROC {100 * auroc:.1f}%"
    )


def s3_env_from_infra() -> None:
    """Point S3 clients at the SeaweedFS started by ``python -m infra start`` when the AWS_*
    variables are not set (the secret goes into this process's environment only)."""
    if os.environ.get("AWS_ENDPOINT_URL") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        return
    from infra.seaweedfs import running_s3

    service = running_s3()
    if service is None:
        raise FileNotFoundError(
            "no S3 endpoint: start SeaweedFS with `python -m infra start --only seaweedfs` "
            "(or set AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
        )
    os.environ.update(service.env())


def upload_demo(local_root: Path, s3_root: str) -> None:
    """Upload the demo's reference set and lot (the linked MVTec files) under ``s3_root``."""
    from concurrent.futures import ThreadPoolExecutor

    from tasks.storage import atomic_write_bytes, exists, filesystem, join

    bucket = s3_root.split("://", 1)[1].split("/", 1)[0]
    fs, _ = filesystem(f"s3://{bucket}")
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    pairs = []
    for sub in ("references", "incoming"):
        base = local_root / sub
        for folder, _, names in os.walk(base, followlinks=True):
            for name in sorted(names):
                path = Path(folder) / name
                pairs.append((path, join(s3_root, sub, path.relative_to(base).as_posix())))

    def put(pair: tuple[Path, str]) -> None:
        if not exists(pair[1]):
            atomic_write_bytes(pair[1], pair[0].read_bytes())

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, pairs))


def compare_with_previous_run(summary, cfg) -> str:
    """How this run's time compares with the lot's previous audit (from its report footer)."""
    from tasks.report import list_reports, report_metadata

    storage = cfg.storage_config()
    reports = list_reports(cfg.layout().lot_reports(summary.product, summary.lot), storage)
    older = [u for u in reports if u != summary.report_uri]
    if not older:
        return "first audit of this lot: run the command again to reuse every embedding"
    previous = report_metadata(older[-1], storage).get("seconds_to_report")
    if not previous:
        return ""
    return (
        f"previous run of this lot took {previous:.1f}s to its report; this one "
        f"{summary.seconds:.1f}s ({previous / max(summary.seconds, 1e-9):.1f}x faster, "
        f"{summary.n_reused} embeddings reused)"
    )


def run_demo(args: argparse.Namespace) -> int:
    """The main job on embedded defaults: local files, an ephemeral Prefect, backbone auto.
    ``--root`` defaults to <repo>/.data/demo; ``--s3 BUCKET`` puts every URI on S3 instead."""
    _quiet()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    given_root = getattr(args, "root", None)
    local = Path(given_root if given_root and not args.s3 else REPO / ".data" / "demo").resolve()
    refs, lot_dir = setup_demo(
        local, Path(args.data).resolve(), args.category, args.shots, args.lot
    )
    root = str(local)
    if args.s3:
        s3_env_from_infra()
        root = given_root or f"s3://{args.s3}/pipeline"
        upload_demo(local, root)
    from flows.audit import audit_lot
    from flows.runtime import with_runner

    # informed is the paper's choice for bottle (Table 8): no rotated reference views
    products = {args.category: {"rotation": getattr(args, "scoring.rotation", "informed")}}
    # the demo's references are links into the MVTec folder: allow links to point there
    links = {"link_roots": [str(Path(args.data).resolve() / args.category)]}
    cfg = load_config(args, {"root": root, "products": products, "storage": links})
    print(f"demo root {root}")
    print(f"  references {refs} ({args.shots} images of {args.category}/train/good)")
    print(f"  lot        {lot_dir} -> {lot_dir.resolve()}")
    summary = with_runner(audit_lot, cfg.runtime)(args.category, args.lot, cfg)
    print(summary.text())
    if summary.html_uri:
        print(f"lot report (open it in a browser): {page_location(summary.html_uri)}")
    print(label_check(summary.report_uri))
    print(compare_with_previous_run(summary, cfg))
    if args.s3:
        import pandas as pd
        import zarr

        df = pd.read_parquet(summary.report_uri)
        maps = zarr.open_group(summary.maps_uri, mode="r")
        print(
            f"read back: pandas.read_parquet({summary.report_uri!r}) -> {len(df)} rows; "
            f"zarr.open_group({summary.maps_uri!r}) -> {len(list(maps['maps'].arrays()))} maps"
        )
    print(f"command wall time {time.perf_counter() - t0:.1f}s (flow {summary.seconds:.1f}s)")
    return outcome(summary)
