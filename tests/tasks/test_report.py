"""The report schema and its documentation agree: every column is in docs/pipeline.md."""

from __future__ import annotations

from pathlib import Path

from tasks.report import REPORT_SCHEMA

DOCS = Path(__file__).resolve().parents[2] / "docs" / "pipeline.md"


def test_every_report_column_is_documented() -> None:
    text = DOCS.read_text()
    table = text[text.index("### Reports (Parquet)") : text.index("### Map archives")]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    documented = {name.strip("` ") for row in rows for name in row.split("|")[1].split(",")}
    missing = [name for name in REPORT_SCHEMA.names if name not in documented]
    assert not missing, f"document these report columns in docs/pipeline.md: {missing}"
