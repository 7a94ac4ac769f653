"""The Prefect UI artifacts of a run: a markdown summary, a table of the flagged images and a
link to the lot page, each under a key per product and lot (``lot-summary-<product>-<lot>``,
``lot-flagged-...``, ``lot-report-...``), so the UI shows the lot's history. Publishing never
fails a run: the Parquet report is the record."""

from __future__ import annotations

from typing import Any

from flows.runtime import artifact_key, markdown_table
from tasks.report import ReportRow
from tasks.retry import run_logger
from tasks.storage import is_local, local_path

MAX_TABLE_ROWS = 500


def lot_keys(product: str, lot: str) -> dict[str, str]:
    """The three artifact keys of a lot (lowercase letters, digits, dashes; deterministic)."""
    return {
        kind: artifact_key("lot", kind, product, lot) for kind in ("summary", "flagged", "report")
    }


def run_markdown(summary: Any, rows: list[ReportRow], top: int = 20) -> str:
    """The summary artifact: a summary table, the most anomalous images, the errors."""
    s = summary
    head = markdown_table(
        ["product", "lot", "run", "method", "images", "flagged", "errors", "reused", "threshold",
         "seconds"],
        [[s.product, s.lot, s.run_id, s.method, s.n_images, s.n_flagged, s.n_errors, s.n_reused,
          s.threshold, s.seconds]],
    )  # fmt: skip
    scored = sorted((r for r in rows if r.score is not None), key=lambda r: -r.score)[:top]
    flagged = markdown_table(
        ["image", "score", "verdict", "peak (y, x)", "overlay"],
        [[r.image_id, r.score, r.verdict, f"({r.max_patch_y}, {r.max_patch_x})", r.overlay_uri]
         for r in scored],
    )  # fmt: skip
    parts = [f"## {s.method} {s.product} / {s.lot}\n", head, f"\nReport: `{s.report_uri}`\n"]
    if getattr(s, "html_uri", None):
        parts.append(f"Lot page: `{s.html_uri}`\n")
    parts += [f"### Highest scores (top {top})\n", flagged]
    errors = [r for r in rows if r.error]
    if errors:
        parts += [
            "\n### Errors\n",
            markdown_table(["image", "error"], [[r.image_id, r.error] for r in errors]),
        ]
    return "\n".join(parts) + "\n"


def flagged_table(rows: list[ReportRow]) -> list[dict[str, Any]]:
    """One row per flagged image, highest score first."""
    flagged = sorted(
        (r for r in rows if r.is_anomalous), key=lambda r: (-(r.score or 0), r.image_id)
    )
    return [
        {
            "image_id": r.image_id,
            "score": None if r.score is None else round(float(r.score), 6),
            "threshold": None if r.threshold is None else round(float(r.threshold), 6),
            "peak_y_x": f"({r.max_patch_y}, {r.max_patch_x})",
            "overlay_uri": r.overlay_uri or "",
        }
        for r in flagged[:MAX_TABLE_ROWS]
    ]


def page_link(html_uri: str) -> str:
    """A link the UI can open: ``file://`` for a local page, the URI as it is otherwise."""
    return local_path(html_uri).as_uri() if is_local(html_uri) else html_uri


def publish_run_artifacts(summary: Any, rows: list[ReportRow], html_uri: str | None) -> None:
    """The markdown summary, the flagged table and (when the page was written) its link."""
    from prefect.artifacts import (
        create_link_artifact,
        create_markdown_artifact,
        create_table_artifact,
    )

    s = summary
    keys = lot_keys(s.product, s.lot)
    what = f"{s.method} {s.product}/{s.lot} run {s.run_id}"
    jobs = [
        (create_markdown_artifact, keys["summary"],
         {"markdown": run_markdown(s, rows), "description": f"summary of {what}"}),
        (create_table_artifact, keys["flagged"],
         {"table": flagged_table(rows), "description": f"flagged images of {what}"}),
    ]  # fmt: skip
    if html_uri:
        jobs.append(
            (create_link_artifact, keys["report"],
             {"link": page_link(html_uri), "link_text": f"lot page of {what}",
              "description": f"the inspector's page of {what}"})
        )  # fmt: skip
    for create, key, kwargs in jobs:
        try:
            create(key=key, **kwargs)
        except Exception as exc:  # the API being unreachable must not lose a finished report
            run_logger().warning("could not publish artifact %s: %s", key, exc)
