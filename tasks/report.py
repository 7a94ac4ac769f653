"""Parquet reports: one file per (product, lot, run), one row per image, written atomically.

The schema (``REPORT_SCHEMA``) is documented column by column in docs/pipeline.md. Report-level
facts (product, lot, run, method, reference version, threshold) are also in the Parquet schema
metadata under ``anomalydino`` so that a report can be recognised from its footer alone.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.retry import TASK_RETRY_OPTIONS, with_storage_retries
from tasks.storage import StorageConfig, atomic_write_bytes, filesystem, list_files

_TS = pa.timestamp("us", tz="UTC")

REPORT_SCHEMA = pa.schema(
    [
        ("product", pa.string()),
        ("lot", pa.string()),
        ("run_id", pa.string()),
        ("flow_run_id", pa.string()),
        ("method", pa.string()),
        ("image_id", pa.string()),
        ("image_uri", pa.string()),
        ("content_sha256", pa.string()),
        ("file_size_bytes", pa.int64()),
        ("image_height", pa.int32()),
        ("image_width", pa.int32()),
        ("score", pa.float64()),
        ("threshold", pa.float64()),
        ("threshold_source", pa.string()),
        ("verdict", pa.string()),
        ("is_anomalous", pa.bool_()),
        ("backbone", pa.string()),
        ("weights_sha256", pa.string()),
        ("resolution", pa.int32()),
        ("precision", pa.string()),
        ("shots", pa.int32()),
        ("reference_version", pa.string()),
        ("bank_uri", pa.string()),
        ("masking", pa.bool_()),
        ("masked_fraction", pa.float64()),
        ("max_patch_row", pa.int32()),
        ("max_patch_col", pa.int32()),
        ("max_patch_y", pa.int32()),
        ("max_patch_x", pa.int32()),
        ("map_uri", pa.string()),
        ("overlay_uri", pa.string()),
        ("scorer", pa.string()),
        ("foundad_score", pa.float64()),
        ("foundad_threshold", pa.float64()),
        ("foundad_threshold_source", pa.string()),
        ("foundad_verdict", pa.string()),
        ("foundad_map_uri", pa.string()),
        ("projector_uri", pa.string()),
        ("embedding_reused", pa.bool_()),
        ("run_started_at", _TS),
        ("scored_at", _TS),
        ("error", pa.string()),
    ]
)


@dataclass(frozen=True)
class ReportRow:
    """One image of a report; field names and order are the Parquet columns."""

    product: str
    lot: str
    run_id: str
    flow_run_id: str | None
    method: str
    image_id: str
    image_uri: str
    content_sha256: str | None
    file_size_bytes: int | None
    image_height: int | None
    image_width: int | None
    score: float | None
    threshold: float | None
    threshold_source: str
    verdict: str
    is_anomalous: bool | None
    backbone: str
    weights_sha256: str
    resolution: int
    precision: str
    shots: int | None
    reference_version: str | None
    bank_uri: str | None
    masking: bool
    masked_fraction: float | None
    max_patch_row: int | None
    max_patch_col: int | None
    max_patch_y: int | None
    max_patch_x: int | None
    map_uri: str | None
    overlay_uri: str | None
    scorer: str  # knn | foundad | both (zero-shot screening: knn)
    foundad_score: float | None
    foundad_threshold: float | None
    foundad_threshold_source: str | None
    foundad_verdict: str | None
    foundad_map_uri: str | None  # scorer both: FoundAD's map (map_uri is the kNN's)
    projector_uri: str | None
    embedding_reused: bool | None
    run_started_at: datetime
    scored_at: datetime | None
    error: str | None


assert [f.name for f in fields(ReportRow)] == REPORT_SCHEMA.names, "ReportRow != REPORT_SCHEMA"


def to_table(rows: Sequence[ReportRow], metadata: dict[str, Any] | None = None) -> pa.Table:
    """Rows sorted by image id, as a table of ``REPORT_SCHEMA`` (+ report-level metadata)."""
    ordered = sorted(rows, key=lambda r: r.image_id)
    table = pa.Table.from_pylist([asdict(r) for r in ordered], schema=REPORT_SCHEMA)
    if metadata:
        meta = {b"anomalydino": json.dumps(metadata, sort_keys=True, default=str).encode()}
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})
    return table


def table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


@task(
    name="write-report",
    **TASK_RETRY_OPTIONS,
    cache_policy=NO_CACHE,
)
def write_report(
    uri: str, rows: list[ReportRow], metadata: dict[str, Any], storage_settings
) -> str:
    """Write the report atomically (readers see the old state or the whole file)."""
    data = table_bytes(to_table(rows, metadata))
    atomic_write_bytes(uri, data, storage_settings.storage_config())
    return uri


def write_table(uri: str, table: pa.Table, storage: StorageConfig | None) -> None:
    data = table_bytes(table)
    with_storage_retries(lambda: atomic_write_bytes(uri, data, storage), what=f"write {uri}")


def read_report(uri: str, storage: StorageConfig | None = None) -> pd.DataFrame:
    """A report as a DataFrame (plain ``pandas.read_parquet`` works as well)."""
    fs, path = filesystem(uri, storage)
    with fs.open(path, "rb") as fh:
        return pq.read_table(fh).to_pandas()


def report_metadata(uri: str, storage: StorageConfig | None = None) -> dict[str, Any]:
    """The report-level metadata from the Parquet footer only."""
    fs, path = filesystem(uri, storage)
    with fs.open(path, "rb") as fh:
        schema = pq.read_schema(fh)
    raw = (schema.metadata or {}).get(b"anomalydino")
    return json.loads(raw) if raw else {}


def list_reports(prefix: str, storage: StorageConfig | None = None) -> list[str]:
    """Report URIs under ``prefix``, oldest first (run ids start with a UTC timestamp)."""
    return sorted(list_files(prefix, [".parquet"], storage), key=lambda u: u.rsplit("/", 1)[-1])
