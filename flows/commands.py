"""The pipeline subcommands of ``anomalydino``: each one runs a flow (``build-bank``, ``audit``,
``nightly``, ``screen``, ``reevaluate``) or the main job end to end (``demo``)."""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from flows.exits import outcome

REPO = Path(__file__).resolve().parents[1]
QUIET_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}


def _quiet() -> None:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def add_config_args(p: argparse.ArgumentParser) -> None:
    """``--config``, every pipeline setting as a flag (generated from the settings model) and
    ``--json``."""
    from flows.settings_cli import add_settings_flags

    add_settings_flags(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def load_config(args: argparse.Namespace, extra: dict[str, Any] | None = None):
    """The run's ``PipelineConfig``: defaults < file < environment < flags < ``extra``."""
    from flows.settings_cli import load_settings

    return load_settings(args, extra)


def _print_result(args: argparse.Namespace, result: Any) -> None:
    if getattr(args, "json", False):
        print(json.dumps(_plain(result), indent=2, default=str))
    elif hasattr(result, "text"):
        print(result.text())
    elif isinstance(result, list):
        for item in result:
            print(item.text() if hasattr(item, "text") else item)
        if not result:
            print("nothing to do")
    else:
        print(result)


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def cmd_config(args: argparse.Namespace) -> int:
    """Print the effective configuration (file < environment < flags) or the settings table."""
    if args.table:
        from flows.settings_cli import settings_table

        print(settings_table(), end="")
        return 0
    import yaml

    print(yaml.safe_dump(load_config(args).model_dump(mode="json"), sort_keys=False), end="")
    return 0


def cmd_build_bank(args: argparse.Namespace) -> int:
    _quiet()
    from flows.banks import bank_markdown
    from flows.build_bank import build_bank
    from flows.runtime import with_runner

    cfg = load_config(args)
    manifest = with_runner(build_bank, cfg.runtime)(args.product, args.version, cfg, args.force)
    if args.json:
        print(manifest.to_json())
    else:
        print(bank_markdown(manifest))
    return 0


def cmd_show_bank(args: argparse.Namespace) -> int:
    from flows.show_bank import bank_text, product_banks

    banks = product_banks(load_config(args), args.product, args.version)
    if args.json:
        print(json.dumps([json.loads(m.to_json()) for m in banks], indent=2))
    else:
        print("\n\n".join(bank_text(m) for m in banks) or "no complete bank")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    _quiet()
    from flows.audit import audit_lot
    from flows.runtime import with_runner

    cfg = load_config(args)
    result = with_runner(audit_lot, cfg.runtime)(args.product, args.lot, cfg, args.version)
    _print_result(args, result)
    return outcome(result)


def cmd_nightly(args: argparse.Namespace) -> int:
    _quiet()
    from flows.audit import nightly_audit

    result = nightly_audit(load_config(args), args.product or None)
    _print_result(args, result)
    return outcome(result)


def cmd_screen(args: argparse.Namespace) -> int:
    _quiet()
    from flows.runtime import with_runner
    from flows.screen import screen_shipment

    cfg = load_config(args)
    result = with_runner(screen_shipment, cfg.runtime)(args.product, args.shipment, cfg)
    _print_result(args, result)
    return outcome(result)


def cmd_reevaluate(args: argparse.Namespace) -> int:
    _quiet()
    from flows.reevaluate import reevaluate, reevaluate_updates
    from flows.runtime import with_runner

    cfg = load_config(args)
    if args.product:
        result = with_runner(reevaluate, cfg.runtime)(args.product, args.version, cfg)
    else:
        result = reevaluate_updates(cfg)
    _print_result(args, result)
    return outcome(result)


# --------------------------------------------------------------------------------- demo


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


def cmd_demo(args: argparse.Namespace) -> int:
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


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    co = sub.add_parser("config", help="print the effective configuration (or --table)")
    co.add_argument("--table", action="store_true", help="every setting, flag and default")
    add_config_args(co)
    co.set_defaults(func=cmd_config)

    bb = sub.add_parser("build-bank", help="build a product's reference bank (a flow run)")
    bb.add_argument("--product", required=True)
    bb.add_argument("--version", default=None, help="reference version (default: the latest)")
    bb.add_argument("--force", action="store_true", help="rebuild even if it exists")
    add_config_args(bb)
    bb.set_defaults(func=cmd_build_bank)

    au = sub.add_parser("audit", help="audit one lot against the product's references")
    au.add_argument("--product", required=True)
    au.add_argument("--lot", required=True)
    au.add_argument("--version", default=None, help="reference version (default: the latest)")
    add_config_args(au)
    au.set_defaults(func=cmd_audit)

    ni = sub.add_parser("nightly", help="audit every lot without a report (the nightly job)")
    ni.add_argument("--product", action="append", help="only these products (repeatable)")
    add_config_args(ni)
    ni.set_defaults(func=cmd_nightly)

    sc = sub.add_parser("screen", help="zero-shot screening of a shipment (no references)")
    sc.add_argument("--product", required=True)
    sc.add_argument("--shipment", required=True, help="folder under incoming/<product>/")
    add_config_args(sc)
    sc.set_defaults(func=cmd_screen)

    re_ = sub.add_parser("reevaluate", help="re-score stored lots after a reference update")
    re_.add_argument("--product", default=None, help="default: every product with a new version")
    re_.add_argument("--version", default=None, help="reference version (default: the latest)")
    add_config_args(re_)
    re_.set_defaults(func=cmd_reevaluate)

    sb = sub.add_parser(
        "show-bank", help="a product's banks: masking decision, evidence, threshold"
    )
    sb.add_argument("--product", required=True)
    sb.add_argument("--version", default=None, help="reference version (default: the latest)")
    add_config_args(sb)
    sb.set_defaults(func=cmd_show_bank)

    de = sub.add_parser(
        "demo",
        help="the nightly audit end to end on MVTec bottle, local files (--rotation: informed)",
    )
    de.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "mvtec_ad"))
    de.add_argument("--category", default="bottle")
    de.add_argument("--lot", default="lot-0001")
    de.add_argument("--shots", type=int, default=4, help="reference images (first N of train)")
    de.add_argument("--s3", metavar="BUCKET", default=None, help="every URI on s3://BUCKET")
    add_config_args(de)
    de.set_defaults(func=cmd_demo)
