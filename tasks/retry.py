"""Storage failures: which are transient (retried, for a bounded time) and which are permanent
(failed at once), the one retry policy built on that, and the logger of the current run.

``failure_class`` looks at an exception and the chain of its causes (the innermost cause that
says something decides: our wrappers re-raise ``OSError("<uri>: ...") from exc``):

* permanent, never retried: a missing object or folder, permission denied (EACCES, EPERM,
  S3 403), no space left (ENOSPC, EDQUOT), a read-only file system, a name or file too large,
  any other S3 4xx except throttling, missing credentials, and everything that is not a storage
  error at all (bad input: ``ValueError``, an undecodable image, a bad config...);
* transient, retried: refused, reset or dropped connections, timeouts, S3 5xx and throttling
  (``SlowDown``, 429, 503), other I/O errors (EIO, EBUSY, EAGAIN).

Retries do not multiply across layers. botocore makes at most 2 attempts per request
(``StorageConfig.s3_options``); ``with_storage_retries`` retries a storage call with backoff
(0.5, 1, 2, 4, 8, 8... s); and one outage clock per process bounds it all: once storage has
failed for ``OUTAGE_BUDGET_S`` (60 s; ``$ANOMALYDINO_STORAGE_RETRY_SECONDS``) since the first
failure of an outage, calls give up with :class:`StorageUnavailableError` (permanent), and
Prefect's task retries (``TASK_RETRY_OPTIONS``, for transient failures outside the wrapped
calls) are not started past it either. So an endpoint gone for good fails a run about a
minute after its first failed request (plus the last call, ~1 s when the connection is
refused; measured with a real SeaweedFS stopped under a running audit: failed 63 s later, 24.5 s
with a 20 s budget; before, ~115 s); one back within the minute costs a pause.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger("anomalydino")

TRANSIENT = "transient"
PERMANENT = "permanent"

#: Errors that say something about one object, not about the storage service.
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
PERMANENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ENOSPC", "EDQUOT", "EACCES", "EPERM", "EROFS", "EFBIG", "ENAMETOOLONG", "EMSGSIZE",
        "EINVAL", "ENOSYS", "ENOENT", "EISDIR", "ENOTDIR", "EEXIST", "ENOTEMPTY", "EREMCHG",
        "EBADF", "ELOOP",
    )
    if hasattr(errno, name)
)  # fmt: skip
#: S3 error codes that mean "slow down / try later" whatever their HTTP status.
THROTTLING_CODES = frozenset(
    {
        "SlowDown", "Throttling", "ThrottlingException", "ThrottledException",
        "RequestThrottled", "RequestThrottledException", "TooManyRequestsException",
        "RequestLimitExceeded", "BandwidthLimitExceeded", "RequestTimeout",
        "RequestTimeoutException", "PriorRequestNotComplete", "ServiceUnavailable",
        "InternalError", "EC2ThrottledException",
    }
)  # fmt: skip
_TRANSIENT_STATUS = frozenset({408, 429})


class StorageUnavailableError(OSError):
    """Storage kept failing transiently for longer than the retry budget: the run gives up."""


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and its causes, outermost first (``__cause__``, else an unsuppressed context)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        cause = current.__cause__
        if cause is None and not current.__suppress_context__:
            cause = current.__context__
        current = cause


def _http_failure(exc: BaseException) -> str | None:
    """Classify an S3 ``ClientError`` (or any exception with a botocore-style ``response``)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    code = str((response.get("Error") or {}).get("Code") or "")
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    if code in THROTTLING_CODES:
        return TRANSIENT
    if not isinstance(status, int) and code.isdigit():
        status = int(code)
    if isinstance(status, int):
        if status >= 500 or status in _TRANSIENT_STATUS:
            return TRANSIENT
        if 400 <= status < 500:
            return PERMANENT
    return None


def _library_failure(exc: BaseException) -> str | None:
    """botocore / aiohttp / urllib3 exceptions that carry no errno or HTTP status."""
    module = type(exc).__module__ or ""
    if not module.startswith(("botocore", "aiobotocore", "aiohttp", "urllib3")):
        return None
    names = {cls.__name__ for cls in type(exc).__mro__}
    transient = ("ConnectionError", "HTTPClientError", "ResponseParserError", "IncompleteRead")
    if names & set(transient) or any("Timeout" in n or "Connect" in n for n in names):
        return TRANSIENT
    status = getattr(exc, "status", None)  # aiohttp.ClientResponseError
    if isinstance(status, int):
        return TRANSIENT if status >= 500 or status in _TRANSIENT_STATUS else PERMANENT
    if module.startswith(("botocore", "aiobotocore")):
        return PERMANENT  # NoCredentialsError, ParamValidationError...: configuration
    return TRANSIENT


def _classify_one(exc: BaseException) -> str | None:
    if isinstance(exc, PERMANENT_ERRORS):
        return PERMANENT
    http = _http_failure(exc)
    if http is not None:
        return http
    if isinstance(exc, OSError) and exc.errno is not None:
        return PERMANENT if exc.errno in PERMANENT_ERRNOS else TRANSIENT
    if isinstance(exc, TimeoutError | ConnectionError):
        return TRANSIENT
    return _library_failure(exc)


def failure_class(exc: BaseException) -> str:
    """``TRANSIENT`` or ``PERMANENT`` (see the module docstring)."""
    chain = list(_chain(exc))
    if any(isinstance(e, StorageUnavailableError) for e in chain):
        return PERMANENT  # the retry budget is spent
    for item in reversed(chain):  # the root cause first
        found = _classify_one(item)
        if found is not None:
            return found
    # an I/O error without errno or cause (e.g. "PNG encoding failed"): worth another try
    return TRANSIENT if any(isinstance(e, OSError) for e in chain) else PERMANENT


def is_transient(exc: BaseException) -> bool:
    """True for a transient storage failure worth a retry."""
    return failure_class(exc) == TRANSIENT


def one_line(exc: BaseException) -> str:
    """The exception as one line: its message, plus the root cause when the message lacks it."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    root = list(_chain(exc))[-1]
    cause = " ".join(str(root).split())
    if root is not exc and cause and cause not in text:
        text += f" ({type(root).__name__}: {cause})"
    return text


# ----------------------------------------------------------------------------- the budget


def _budget_from_env() -> float:
    try:
        return max(0.0, float(os.environ.get("ANOMALYDINO_STORAGE_RETRY_SECONDS", "60")))
    except ValueError:
        return 60.0


OUTAGE_BUDGET_S = _budget_from_env()


class OutageClock:
    """When the current storage outage began (the first transient failure since the last
    success, or since a quiet gap longer than the budget); shared by all threads of a process."""

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self._lock = threading.Lock()
        self._first: float | None = None
        self._last: float | None = None

    def failed(self, now: float | None = None) -> float:
        """Record a transient failure; seconds since the outage began."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if self._first is None or now - (self._last or now) > self.budget:
                self._first = now
            self._last = now
            return now - self._first

    def ok(self) -> None:
        """A storage call succeeded: the outage (if any) is over."""
        with self._lock:
            self._first = self._last = None

    def began(self) -> float | None:
        with self._lock:
            return self._first


OUTAGE = OutageClock(OUTAGE_BUDGET_S)


def with_storage_retries(
    fn: Callable[[], T],
    *,
    what: str,
    attempts: int | None = None,
    delay: float = 0.5,
    max_delay: float = 8.0,
) -> T:
    """``fn()``, retried with exponential backoff on transient storage errors while the outage
    lasts less than the budget (``attempts`` caps the tries too); a permanent error raises at
    once, an outage over the budget raises :class:`StorageUnavailableError` naming ``what``."""
    start: float | None = None
    attempt = 0
    while True:
        attempt += 1
        try:
            result = fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            now = time.monotonic()
            start = now if start is None else start
            outage = OUTAGE.failed(now)
            began = min(start, OUTAGE.began() or start)
            spent = now - began
            if spent >= OUTAGE.budget or (attempts is not None and attempt >= attempts):
                if attempts is not None and spent < OUTAGE.budget:
                    raise
                raise StorageUnavailableError(
                    f"{what}: storage unavailable for {spent:.0f}s, giving up (retry budget "
                    f"{OUTAGE.budget:.0f}s): {one_line(exc)}"
                ) from exc
            pause = min(delay * 2 ** (attempt - 1), max_delay, OUTAGE.budget - spent)
            (log.warning if attempt == 1 else log.debug)(
                "%s failed (%s), outage %.0fs, retrying in %.1fs",
                what,
                one_line(exc),
                outage,
                pause,
            )
            time.sleep(max(pause, 0.0))
        else:
            OUTAGE.ok()
            return result


def _next_delay(task: Any, task_run: Any) -> float:
    """The pause Prefect takes before the next attempt (as its task engine picks it)."""
    delays = getattr(task, "retry_delay_seconds", None)
    if isinstance(delays, int | float):
        return float(delays)
    if not delays:
        return 0.0
    done = int(getattr(task_run, "run_count", 1) or 1)
    return float(delays[min(max(done - 1, 0), len(delays) - 1)])


def retry_on_storage_error(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry a failed task only for a transient storage error,
    and only if the next attempt starts within the outage budget."""
    try:
        state.result()
    except Exception as exc:
        if not is_transient(exc):
            return False
        return OUTAGE.failed() + _next_delay(task, task_run) < OUTAGE.budget
    return False


#: Task options shared by every task that touches storage: the retry condition above stops the
#: retries once the outage budget is spent, so the count only caps short bursts of failures.
TASK_RETRY_OPTIONS: dict[str, Any] = dict(
    retries=16,
    retry_delay_seconds=[1, 2, 4] + [5] * 13,  # short pauses: a retry never overshoots by much
    retry_condition_fn=retry_on_storage_error,
)


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task run (shipped to the API), else a plain one."""
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:  # MissingContextError outside a run
        return log
