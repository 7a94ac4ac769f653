"""The ``anomalydino`` command line."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--backbone", default="auto", help="auto | dinov2_vits14 | ... | efficientnet_lite0"
    )
    g.add_argument("--weights", default=None, help="weights file or URI (s3://..., https://...)")
    g.add_argument("--resolution", type=int, default=448, help="smaller edge in pixels (448)")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    g.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda:0")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _add_scoring_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scoring")
    g.add_argument("--image-score", choices=["top1p_mean", "max", "max_map"], default="top1p_mean")
    g.add_argument("--index", choices=["exact", "exact_bf16", "hnsw", "ivf"], default="exact")
    g.add_argument("--zero-shot-statistic", choices=["code_mean", "quantile"], default="code_mean")
    g.add_argument("--zero-shot-alpha", type=float, default=0.001)
    g.add_argument("--memory-budget-gb", type=float, default=2.0)


def _model_settings(args):
    from anomalydino_core.config import ModelSettings

    return ModelSettings(
        backbone=args.backbone,
        weights=args.weights,
        resolution=args.resolution,
        precision=args.precision,
        device=args.device,
        batch_size=args.batch_size,
        threads=args.threads,
    )


def _check_weights(model) -> None:
    """Resolve a named backbone's weights up front (``auto`` falls back later, with a warning)."""
    if model.backbone == "auto":
        return
    from anomalydino_core.backbones import get_backbone_spec
    from tasks.models import remote_fetcher
    from tasks.weights import resolve_weights

    resolve_weights(
        get_backbone_spec(model.backbone), model.weights, fetch_remote=remote_fetcher(None)
    )


def _evaluate(args) -> int:
    from anomalydino_core.backbones import WeightsUnavailableError
    from anomalydino_core.config import ScoringSettings
    from anomalydino_core.evaluation import EvaluationRequest, parse_shots
    from tasks.evaluation import write_outputs

    request = EvaluationRequest(
        data=Path(args.data),
        category=args.category,
        shots=parse_shots(args.shots),
        seeds=tuple(int(s) for s in str(args.seeds).split(",") if s.strip()),
        preprocess=args.preprocess,
        model=_model_settings(args),
        scoring=ScoringSettings(
            image_score=args.image_score,
            index=args.index,
            zero_shot_statistic=args.zero_shot_statistic,
            zero_shot_alpha=args.zero_shot_alpha,
            memory_budget_gb=args.memory_budget_gb,
        ),
    )
    t0 = time.perf_counter()
    try:
        _check_weights(request.model)  # fail in seconds, before a Prefect server is started
        from flows.evaluate import evaluate

        df = evaluate(request)  # a flow run
    except WeightsUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    parquet, md, table = write_outputs(df, args.out)
    print(table)
    print(f"wrote {parquet} and {md} ({time.perf_counter() - t0:.0f}s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anomalydino", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("evaluate", help="MVTec-protocol evaluation of one category")
    ev.add_argument("--data", required=True, help="root folder with CATEGORY/{train,test,...}")
    ev.add_argument("--category", required=True)
    ev.add_argument("--shots", default="1,2,4,8,16", help="e.g. 1,2,4,8,16 | full | 0 (zero-shot)")
    ev.add_argument("--seeds", default="0,1,2")
    ev.add_argument(
        "--preprocess", choices=["agnostic", "informed", "masking_only", "none"], default="agnostic"
    )
    ev.add_argument("--out", default="runs/evaluate")
    _add_model_args(ev)
    _add_scoring_args(ev)
    ev.set_defaults(func=_evaluate, preflight=lambda a: _check_weights(_model_settings(a)))

    from flows.commands import add_subcommands

    add_subcommands(sub)
    return parser


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """Warnings as one ``warning:`` line (no source line: users read these, not developers)."""
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    """Exit codes (``flows/exits.py``): 0 done, 1 the run failed, 2 bad input or config,
    3 partial (the report holds error rows); a failure ends with one ``error:`` line."""
    warnings.formatwarning = _warning_line
    args = build_parser().parse_args(argv)
    from flows.exits import run_command

    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
