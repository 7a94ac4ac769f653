"""``anomalydino report RUN_URI_OR_ID [--open]``: rebuild a stored run's HTML lot page from its
Parquet report, map archive and metadata (``tasks.lot_report``), print where it is, and open it
in a browser on request. No flow run, no Prefect server."""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path

from tasks.lot_report import files_uri_of, html_uri_of, write_lot_report
from tasks.report import list_reports
from tasks.storage import StorageConfig, exists, filesystem, is_local, join, local_path

RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def find_report(target: str, root: str, storage: StorageConfig | None) -> str:
    """The report URI of ``target``: a report's ``.parquet`` URI, its page's ``.html``, or a run
    id (or the unique start of one) searched under ``<root>/reports``. Raises ``ValueError``
    (or ``FileNotFoundError``) with what was looked for."""
    target = target.strip()
    if target.endswith((".parquet", ".html")):
        uri = re.sub(r"\.html$", ".parquet", target)
        if not exists(uri, storage):
            raise FileNotFoundError(f"no report at {uri}")
        return uri
    if not RUN_ID.match(target):
        raise ValueError(
            f"{target!r} is neither a report (.parquet or .html URI) nor a run id "
            "(like 20260101T020000Z-1a2b3c4d)"
        )
    reports_root = join(root, "reports")
    names = {
        u: u.rsplit("/", 1)[-1].removesuffix(".parquet")
        for u in list_reports(reports_root, storage)
    }
    exact = [u for u, name in names.items() if name == target]
    found = exact or [u for u, name in names.items() if name.startswith(target)]
    if not found:
        raise ValueError(f"no report of run {target!r} under {reports_root}")
    if len(found) > 1:
        raise ValueError(
            f"run id {target!r} is ambiguous under {reports_root}: "
            + ", ".join(names[u] for u in found[:10])
        )
    return found[0]


def local_copy(html_uri: str, storage: StorageConfig | None) -> Path:
    """The page and its ``_files`` folder copied from object storage into a new temporary
    folder (kept: the browser reads it after this process ends); the local page's path."""
    folder = Path(tempfile.mkdtemp(prefix="anomalydino-report-"))
    fs, path = filesystem(html_uri, storage)
    page = folder / path.rsplit("/", 1)[-1]
    fs.get(path, str(page))
    _, files = filesystem(files_uri_of(html_uri.removesuffix(".html") + ".parquet"), storage)
    if fs.exists(files):
        fs.get(files.rstrip("/") + "/", str(folder / files.rsplit("/", 1)[-1]), recursive=True)
    return page


def open_page(html_uri: str, storage: StorageConfig | None) -> str:
    """Open the page in a browser if there is one; says what happened."""
    import webbrowser

    path = local_path(html_uri) if is_local(html_uri) else local_copy(html_uri, storage)
    try:
        browser = webbrowser.get()
    except webbrowser.Error:
        return f"no browser available here; open {path.as_uri()}"
    if not browser.open(path.as_uri()):
        return f"the browser did not open; open {path.as_uri()}"
    return f"opened {path.as_uri()}"


def rebuild(target: str, root: str, storage: StorageConfig | None) -> dict[str, object]:
    """Rewrite the page of ``target`` (see ``find_report``); its report, page and seconds."""
    report_uri = find_report(target, root, storage)
    t0 = time.perf_counter()
    html_uri = write_lot_report(report_uri, storage)
    assert html_uri == html_uri_of(report_uri)
    return {
        "report_uri": report_uri,
        "html_uri": html_uri,
        "seconds": round(time.perf_counter() - t0, 3),
    }
