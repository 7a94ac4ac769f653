"""Retries on storage errors only (never on bad input), and the logger of the current run."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from tasks.storage import is_storage_error

T = TypeVar("T")
log = logging.getLogger("anomalydino")


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task run (shipped to the API), else a plain one."""
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:  # MissingContextError outside a run
        return log


def retry_on_storage_error(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry a failed task only for transient storage errors."""
    try:
        state.result()
    except Exception as exc:
        return is_storage_error(exc)
    return False


def with_storage_retries(
    fn: Callable[[], T], *, what: str, attempts: int = 3, delay: float = 0.5
) -> T:
    """``fn()``, retried with exponential backoff on transient storage errors only."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt == attempts or not is_storage_error(exc):
                raise
            log.warning(
                "%s failed (%s), attempt %d/%d", what, type(exc).__name__, attempt, attempts
            )
            time.sleep(delay * 2 ** (attempt - 1))
    raise AssertionError("unreachable")
