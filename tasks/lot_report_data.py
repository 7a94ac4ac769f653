"""What a lot report page shows, read from a run's Parquet report: the summary facts, the rows
in score order, the score histogram's geometry, the previous run of a re-evaluation, the
reference images of a few-shot run. Plain data for ``tasks.lot_report`` and its templates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from tasks.report import read_report, report_metadata
from tasks.storage import StorageConfig

METHOD_LABELS = {
    "few_shot": "few-shot audit (against a reference set)",
    "zero_shot": "zero-shot screening (no references)",
}


def _clean(value: Any) -> Any:
    """NaN/NaT/pandas NA -> None; numpy scalars -> Python scalars."""
    if value is None:
        return None
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        return value
    return value.item() if hasattr(value, "item") else value


INT_COLUMNS = ("image_height", "image_width", "resolution", "shots", "max_patch_row",
               "max_patch_col", "max_patch_y", "max_patch_x", "file_size_bytes")  # fmt: skip


def _row(rec: dict[str, Any]) -> dict[str, Any]:
    row = {k: _clean(v) for k, v in rec.items()}
    for k in INT_COLUMNS:  # integers with a missing value come back as floats
        if isinstance(row.get(k), float):
            row[k] = int(row[k])
    error = row.get("error")
    prefix = f"{row.get('image_id')}: "
    row["reason"] = error[len(prefix) :] if error and error.startswith(prefix) else error
    return row


def report_rows(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as plain dicts, scored ones by score descending (then id), unscored ones last;
    ``reason`` is the error without the image id it starts with."""
    rows = [_row(rec) for rec in df.to_dict("records")]
    return sorted(
        rows,
        key=lambda r: (r["score"] is None, -(r["score"] or 0.0), str(r["image_id"])),
    )


# ---------------------------------------------------------------------------- histogram


def nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    """Round tick values covering [lo, hi] (steps of 1, 2, 2.5 or 5 x 10^k)."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / max(target - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    n = int(math.floor((hi - first) / step + 1e-9)) + 1
    return [round(first + i * step, 12) for i in range(n)]


def fmt_score(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.4f}"


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    count: int
    lo: float
    hi: float
    above: bool


@dataclass(frozen=True)
class Marker:
    x: float
    label: str
    value: float


@dataclass(frozen=True)
class Histogram:
    """SVG geometry of the lot's score distribution (user units of a ``width x height`` box)."""

    width: int
    height: int
    left: int
    right: int
    top: int
    bottom: int
    bars: list[Bar]
    rug: list[tuple[float, bool]]  # (x, above threshold)
    x_ticks: list[tuple[float, str]]
    y_ticks: list[tuple[float, str]]
    threshold: Marker | None
    old_threshold: Marker | None
    n_scores: int
    n_above: int
    description: str


def histogram(
    scores: Sequence[float],
    threshold: float | None,
    old_threshold: float | None = None,
    *,
    width: int = 720,
    height: int = 260,
) -> Histogram:
    """Bins whose edges fall on the threshold (a bar is wholly below or above it)."""
    left, right, top, bottom = 48, 16, 28, 56
    scores = [float(s) for s in scores if s is not None and math.isfinite(s)]
    marks = [v for v in (threshold, old_threshold) if v is not None]
    lo = min([0.0, *scores, *marks])
    hi = max([*scores, *marks, lo + 1e-6]) * 1.06 if scores or marks else 1.0
    n_bins = int(min(40, max(10, 2 * math.sqrt(max(len(scores), 1)))))
    step = (hi - lo) / n_bins
    start = lo
    if threshold is not None:  # align an edge on the threshold
        start = threshold - math.ceil((threshold - lo) / step - 1e-9) * step
    edges = [start + i * step for i in range(int(math.ceil((hi - start) / step)) + 1)]
    counts = [0] * (len(edges) - 1)
    for s in scores:
        i = min(max(int((s - start) // step), 0), len(counts) - 1)
        counts[i] += 1
    x0, x1 = edges[0], edges[-1]
    plot_w, plot_h = width - left - right, height - top - bottom

    def sx(v: float) -> float:
        return round(left + (v - x0) / (x1 - x0) * plot_w, 2)

    top_count = max(counts, default=0) or 1
    y_max = max(nice_ticks(0, top_count, 5)[-1], top_count)

    def sy(c: float) -> float:
        return round(top + plot_h - c / y_max * plot_h, 2)

    bars = [
        Bar(
            x=sx(a),
            y=sy(c),
            width=max(round(sx(b) - sx(a) - 1, 2), 0.5),
            height=round(sy(0) - sy(c), 2),
            count=c,
            lo=a,
            hi=b,
            above=threshold is not None and a >= threshold - 1e-12,
        )
        for a, b, c in zip(edges, edges[1:], counts, strict=False)
        if c
    ]
    above = 0 if threshold is None else sum(1 for s in scores if s > threshold)
    desc = f"Histogram of {len(scores)} image scores from {fmt_score(min(scores, default=None))}"
    desc += f" to {fmt_score(max(scores, default=None))}."
    if threshold is not None:
        desc += f" {above} above the threshold {fmt_score(threshold)}."
    if old_threshold is not None:
        desc += f" The previous threshold was {fmt_score(old_threshold)}."
    return Histogram(
        width=width,
        height=height,
        left=left,
        right=right,
        top=top,
        bottom=bottom,
        bars=bars,
        rug=[(sx(s), threshold is not None and s > threshold) for s in scores],
        x_ticks=[(sx(t), f"{t:g}") for t in nice_ticks(x0, x1) if x0 <= t <= x1],
        y_ticks=[(sy(t), f"{t:g}") for t in nice_ticks(0, y_max, 5) if t == int(t)],
        threshold=None if threshold is None else Marker(sx(threshold), "threshold", threshold),
        old_threshold=None
        if old_threshold is None
        else Marker(sx(old_threshold), "previous threshold", old_threshold),
        n_scores=len(scores),
        n_above=above,
        description=desc,
    )


# ------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class Change:
    image_id: str
    old_verdict: str | None
    new_verdict: str | None
    old_score: float | None
    new_score: float | None


@dataclass
class Previous:
    """The report a re-evaluation re-scored (``reevaluates`` in the metadata)."""

    uri: str
    run_id: str | None = None
    reference_version: str | None = None
    threshold: float | None = None
    changes: list[Change] = field(default_factory=list)
    error: str | None = None


def previous_run(uri: str, rows: list[dict[str, Any]], storage: StorageConfig | None) -> Previous:
    """The old threshold and the verdicts that changed, from the re-evaluated report."""
    try:
        meta = report_metadata(uri, storage)
        old = {str(r["image_id"]): r for r in report_rows(read_report(uri, storage))}
    except Exception as exc:  # the page still renders; it says why the comparison is missing
        return Previous(uri=uri, error=f"{type(exc).__name__}: {exc}")
    changes = [
        Change(r["image_id"], o.get("verdict"), r["verdict"], o.get("score"), r["score"])
        for r in rows
        if (o := old.get(str(r["image_id"]))) is not None and o.get("verdict") != r["verdict"]
    ]
    return Previous(
        uri=uri,
        run_id=meta.get("run_id"),
        reference_version=meta.get("reference_version"),
        threshold=_clean(meta.get("threshold")),
        changes=changes,
    )


def reference_images(meta: dict[str, Any], storage: StorageConfig | None) -> list[dict]:
    """[{image_id, uri}] of a few-shot run's references: the metadata's ``references`` if it
    has them, else the bank manifest at ``bank_uri``; [] when neither can be read."""
    listed = meta.get("references")
    if isinstance(listed, list):
        return [{"image_id": str(r["image_id"]), "uri": str(r["uri"])} for r in listed]
    if meta.get("method") != "few_shot" or not meta.get("bank_uri"):
        return []
    from tasks.bank import read_manifest

    try:
        manifest = read_manifest(meta["bank_uri"], storage)
    except Exception:
        return []
    if manifest is None:
        return []
    return [{"image_id": r.image_id, "uri": r.uri} for r in manifest.references]


def _when(iso: str | None) -> str | None:
    """An ISO timestamp as ``YYYY-MM-DD HH:MM:SS UTC`` (as it is if it does not parse)."""
    try:
        return pd.Timestamp(iso).tz_convert("UTC").strftime("%Y-%m-%d %H:%M:%S UTC")
    except (TypeError, ValueError):
        return iso


def first(rows: list[dict[str, Any]], key: str) -> Any:
    return next((r[key] for r in rows if r.get(key) is not None), None)


def summary_facts(meta: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The numbers and identities of the summary block."""
    verdicts = [r["verdict"] for r in rows]
    model = meta.get("model") or {}
    masking = meta.get("masking") or {}
    timings = {"until the report was written": meta.get("seconds_to_report")}
    timings.update(meta.get("timings") or {})
    method = meta.get("method") or first(rows, "method")
    label = METHOD_LABELS.get(method, method or "unknown")
    if meta.get("reevaluates"):
        label = f"re-evaluation: {label}, re-scored from stored embeddings"
    return {
        "product": meta.get("product") or first(rows, "product"),
        "lot": meta.get("lot") or first(rows, "lot"),
        "run_id": meta.get("run_id") or first(rows, "run_id"),
        "flow_run_id": meta.get("flow_run_id"),
        "method": method,
        "method_label": label,
        "started": _when(meta.get("run_started_at")),
        "runner": meta.get("runner"),
        "reference_version": meta.get("reference_version") or first(rows, "reference_version"),
        "bank_uri": meta.get("bank_uri") or first(rows, "bank_uri"),
        "bank_key": meta.get("bank_key"),
        "threshold": _clean(meta.get("threshold", first(rows, "threshold"))),
        "threshold_source": meta.get("threshold_source") or first(rows, "threshold_source"),
        "threshold_reason": meta.get("threshold_reason"),
        "n_images": len(rows),
        "n_flagged": verdicts.count("anomalous"),
        "n_normal": verdicts.count("normal"),
        "n_errors": verdicts.count("error"),
        "n_no_threshold": verdicts.count("no_threshold"),
        "backbone": first(rows, "backbone") or model.get("backbone"),
        "resolution": first(rows, "resolution") or model.get("resolution"),
        "precision": first(rows, "precision") or model.get("precision"),
        "weights_sha256": first(rows, "weights_sha256") or meta.get("weights_sha256"),
        "shots": first(rows, "shots"),
        "scorer": meta.get("scorer") or first(rows, "scorer") or "knn",
        "foundad_threshold": _clean(
            meta.get("foundad_threshold", first(rows, "foundad_threshold"))
        ),
        "foundad_threshold_source": meta.get("foundad_threshold_source"),
        "n_foundad_flagged": [r.get("foundad_verdict") for r in rows].count("anomalous"),
        "masking": masking.get("use_mask"),
        "masking_reason": masking.get("reason"),
        "timings": {k: v for k, v in timings.items() if v is not None},
    }
