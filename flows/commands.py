"""The pipeline subcommands of ``anomalydino``: each one runs a flow (``build-bank``, ``audit``,
``nightly``, ``screen``, ``reevaluate``) or the main job end to end (``demo``); ``export`` writes
a backbone for OpenVINO or ONNX Runtime."""

from __future__ import annotations

import argparse
import json
import os
import typing
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from flows.exits import outcome

REPO = Path(__file__).resolve().parents[1]
#: settings that do not change an export (batch-dynamic, CPU; its weights fp32, or int8 with
#: --precision int8: bf16 is a compile hint)
EXPORT_EXCLUDES = frozenset(
    {"root", "incoming", "references", "model.device", "model.runtime"}
    | {"model.batch_size", "model.decode_max_pixels"}
)
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


def cmd_report(args: argparse.Namespace) -> int:
    """Rebuild a stored run's lot page; print where it is; ``--open`` it in a browser."""
    from flows.lot_page import open_page, rebuild

    cfg = load_config(args)
    storage = cfg.storage_config()
    done = rebuild(args.run, cfg.root, storage)
    if args.json:
        print(json.dumps(done, indent=2))
    else:
        print(f"lot page  {done['html_uri']}")
        print(f"  rebuilt from {done['report_uri']} in {done['seconds']:.2f}s")
    if args.open:
        print(open_page(str(done["html_uri"]), storage))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a backbone for one input size, read it back and check it against fp32 torch."""
    import torch

    from anomalydino_core.runtimes import check_against_torch
    from tasks.exports import ensure_export, open_export, stored_weights
    from tasks.machine import cache_root
    from tasks.models import remote_fetcher
    from tasks.weights import load_backbone

    model = load_config(args).model
    backbone = load_backbone(
        model.backbone, weights=model.weights, fetch_remote=remote_fetcher(None)
    )
    preprocess = backbone.preprocess(model.resolution)
    image_hw = _image_size(args.image_size) if args.image_size else (model.resolution,) * 2
    input_hw = preprocess.input_size(image_hw)
    base = Path(args.output) if args.output else cache_root() / "exports"
    stored = stored_weights(model.precision)  # --precision int8: int8 weights
    folder, written = ensure_export(backbone, args.format, input_hw, base, stored)
    threads = model.threads or torch.get_num_threads()
    runner = open_export(folder, args.format, precision=stored, threads=threads)
    check = check_against_torch(runner, args.format, backbone.module, input_hw)
    result = {
        "folder": str(folder),
        "written": written,
        "backbone": backbone.identity.name,
        "weights_sha256": backbone.identity.weights_sha256,
        "input_hw": list(input_hw),
        "weights": stored,
        "min_patch_cosine": check.min_patch_cosine,
        "check_passed": check.passed,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{'wrote' if written else 'found'} {folder}")
        print(f"  {check.text()} ({stored} weights, against fp32 torch)")
    return 0 if check.passed else 1


def _image_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--image-size {text!r}: expected HEIGHTxWIDTH, e.g. 900x1200") from None
    if height <= 0 or width <= 0:
        raise ValueError(f"--image-size {text!r}: both edges must be positive")
    return height, width


def cmd_demo(args: argparse.Namespace) -> int:
    from flows.demo import run_demo

    return run_demo(args)


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

    rp = sub.add_parser(
        "report",
        help="rebuild a stored run's HTML lot page (from its report, maps, metadata)",
    )
    rp.add_argument(
        "run",
        metavar="RUN_URI_OR_ID",
        help="a report (.parquet), its page (.html), or a run id under <root>/reports",
    )
    rp.add_argument("--open", action="store_true", help="open the page in a browser")
    add_config_args(rp)
    rp.set_defaults(func=cmd_report)

    from anomalydino_core.choices import ExportFormat
    from flows.settings_cli import add_settings_flags

    ex = sub.add_parser(
        "export",
        help="export the model's backbone for OpenVINO or ONNX Runtime (checked against fp32 torch)",
    )
    ex.add_argument("--format", required=True, choices=typing.get_args(ExportFormat))
    ex.add_argument(
        "--image-size",
        default=None,
        metavar="HxW",
        help="size of the images to embed, for another input shape than resolution x resolution",
    )
    ex.add_argument(
        "--output",
        default=None,
        metavar="DIR",
        help="where to write (default: the cache the pipeline reads, $ANOMALYDINO_CACHE/exports "
        "or ~/.cache/anomalydino/exports)",
    )
    ex.add_argument("--json", action="store_true", help="print the result as JSON")
    # --config, --backbone, --weights, --resolution, --threads: the model settings it exports
    add_settings_flags(ex, ("model",), exclude=EXPORT_EXCLUDES)
    ex.set_defaults(func=cmd_export)

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
