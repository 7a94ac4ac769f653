"""No map folder that no report references: what a failed run started is removed.

A run writes ``maps/<product>/<lot>/<run_id>/`` (map archive, overlays) before its report, the
last thing it writes. If the flow run fails or crashes, ``drop_partial_outputs`` (its Prefect
``on_failure`` / ``on_crashed`` hook) removes every map folder the run opened whose report does
not exist. A run that could not do so (killed with ``kill -9``, or storage down while failing)
leaves a folder without a report; the next run of the same lot removes such folders once they
are older than ``STALE_AFTER`` (run ids start with their UTC start time; a younger one may be a
run still in progress). Readers never look into a map folder except through a report.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

from tasks.report import list_reports
from tasks.retry import run_logger
from tasks.storage import StorageConfig, filesystem, join, list_dirs
from tasks.storage import exists as storage_exists

#: A run folder without a report older than this is a leftover (no audit runs this long).
STALE_AFTER = timedelta(hours=12)

_LOCK = threading.Lock()
_STARTED: dict[str, list[tuple[str, str, StorageConfig]]] = defaultdict(list)


def started(flow_run_id: str | None, report_uri: str, run_maps_uri: str, storage) -> None:
    """Record that this flow run writes ``run_maps_uri`` before ``report_uri``."""
    if flow_run_id:
        with _LOCK:
            _STARTED[str(flow_run_id)].append((report_uri, run_maps_uri, storage))


def remove_tree(uri: str, storage: StorageConfig | None) -> bool:
    """Delete the folder (prefix) ``uri`` and all below it; False if that failed."""
    try:
        fs, path = filesystem(uri, storage)
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        return True
    except Exception as exc:
        run_logger().warning("could not remove %s (%s)", uri, exc)
        return False
    return True


def drop_partial_outputs(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect flow hook (failed / crashed): remove the map folders of this run that have no
    report. Never raises (a hook's failure would hide the run's own error)."""
    with _LOCK:
        entries = _STARTED.pop(str(flow_run.id), [])
    for report_uri, maps_uri, storage in entries:
        try:
            if storage_exists(report_uri, storage):
                continue
        except Exception as exc:
            run_logger().warning(
                "left %s in place: cannot check %s (%s)", maps_uri, report_uri, exc
            )
            continue
        if remove_tree(maps_uri, storage):
            run_logger().info("removed the partial map folder %s of this failed run", maps_uri)
        else:
            run_logger().warning("the next run of this lot removes %s", maps_uri)


#: ``@flow(..., **FLOW_HOOKS)``: the flows that open map archives.
FLOW_HOOKS: dict[str, Any] = {
    "on_failure": [drop_partial_outputs],
    "on_crashed": [drop_partial_outputs],
}


def run_started_at(run_id: str) -> datetime | None:
    """The UTC start time encoded at the head of a run id (``20250101T020000Z-...``)."""
    try:
        return datetime.strptime(run_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def remove_stale_runs(
    maps_lot_uri: str,
    reports_lot_uri: str,
    storage: StorageConfig | None,
    *,
    now: datetime | None = None,
    keep: str | None = None,
) -> list[str]:
    """Remove the run folders under ``maps_lot_uri`` that no report under ``reports_lot_uri``
    references and that are older than ``STALE_AFTER`` (never ``keep``). Returns the removed
    run ids. Never raises: this is housekeeping."""
    now = now or datetime.now(UTC)
    try:
        runs = list_dirs(maps_lot_uri, storage)
        if not runs:
            return []
        reported = {
            u.rsplit("/", 1)[-1].removesuffix(".parquet")
            for u in list_reports(reports_lot_uri, storage)
        }
    except Exception as exc:
        run_logger().warning("no clean-up of %s (%s)", maps_lot_uri, exc)
        return []
    removed = []
    for run_id in runs:
        began = run_started_at(run_id)
        if run_id in reported or run_id == keep or began is None or now - began < STALE_AFTER:
            continue
        if remove_tree(join(maps_lot_uri, run_id), storage):
            removed.append(run_id)
    if removed:
        run_logger().warning(
            "removed %d map folder(s) of runs that wrote no report: %s",
            len(removed),
            ", ".join(join(maps_lot_uri, r) for r in removed),
        )
    return removed
