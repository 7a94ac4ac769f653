"""Transient storage failures are retried within one time budget; permanent ones fail at once
(tasks/retry.py). No services: the failures are raised by hand, as the libraries raise them."""

from __future__ import annotations

import errno
import time

import botocore.exceptions as bex
import pytest

from tasks import retry
from tasks.retry import (
    PERMANENT,
    TRANSIENT,
    StorageUnavailableError,
    failure_class,
    retry_on_storage_error,
    with_storage_retries,
)
from tasks.storage import atomic_write_bytes, is_storage_error


def _wrapped(inner: BaseException, message: str = "s3://b/k: write failed") -> OSError:
    """``inner`` re-raised the way our storage wrappers do: ``OSError(...) from inner``."""
    try:
        try:
            raise inner
        except BaseException as exc:
            raise OSError(message) from exc
    except OSError as outer:
        return outer


def _client_error(code: str, status: int) -> bex.ClientError:
    response = {
        "Error": {"Code": code, "Message": code},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return bex.ClientError(response, "PutObject")


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), PERMANENT),
        (_wrapped(OSError(errno.ENOSPC, "No space left on device")), PERMANENT),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), PERMANENT),
        (PermissionError(errno.EACCES, "Permission denied"), PERMANENT),
        (_wrapped(OSError(errno.EROFS, "Read-only file system")), PERMANENT),
        (FileNotFoundError("s3://b/k: no such file or object"), PERMANENT),
        (_wrapped(_client_error("AccessDenied", 403)), PERMANENT),
        (_wrapped(_client_error("NoSuchBucket", 404)), PERMANENT),
        (_wrapped(_client_error("InvalidArgument", 400)), PERMANENT),
        (_wrapped(_client_error("SlowDown", 503)), TRANSIENT),
        (_wrapped(_client_error("TooManyRequests", 429)), TRANSIENT),
        (_wrapped(_client_error("InternalError", 500)), TRANSIENT),
        (_wrapped(_client_error("RequestTimeout", 400)), TRANSIENT),
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed"), TRANSIENT),
        (_wrapped(ConnectionResetError(errno.ECONNRESET, "reset by peer")), TRANSIENT),
        (_wrapped(bex.EndpointConnectionError(endpoint_url="http://127.0.0.1:9")), TRANSIENT),
        (bex.ReadTimeoutError(endpoint_url="http://127.0.0.1:9"), TRANSIENT),
        (bex.NoCredentialsError(), PERMANENT),
        (TimeoutError("timed out"), TRANSIENT),
        (OSError(errno.EIO, "Input/output error"), TRANSIENT),
        (OSError("PNG encoding failed"), TRANSIENT),
        (ValueError("bad input"), PERMANENT),
        (KeyError("image"), PERMANENT),
        (StorageUnavailableError("gave up"), PERMANENT),
    ],
)
def test_failure_classes(exc: BaseException, expected: str) -> None:
    assert failure_class(exc) == expected
    assert is_storage_error(exc) == (expected == TRANSIENT)


def test_budget_spent_is_permanent_even_over_a_transient_cause() -> None:
    try:
        raise StorageUnavailableError("gave up") from ConnectionRefusedError(111, "refused")
    except StorageUnavailableError as exc:
        assert failure_class(exc) == PERMANENT


@pytest.fixture
def budget(monkeypatch):
    """A fresh outage clock with a 1.5 s budget."""
    clock = retry.OutageClock(1.5)
    monkeypatch.setattr(retry, "OUTAGE", clock)
    return clock


def test_an_outage_is_retried_until_the_budget_then_given_up(budget) -> None:
    calls = []

    def down() -> None:
        calls.append(time.monotonic())
        raise _wrapped(bex.EndpointConnectionError(endpoint_url="http://127.0.0.1:9"))

    t0 = time.monotonic()
    with pytest.raises(StorageUnavailableError, match=r"write s3://b/k: storage unavailable"):
        with_storage_retries(down, what="write s3://b/k")
    spent = time.monotonic() - t0
    assert 1.5 <= spent < 2.5 and len(calls) >= 3
    # the budget is per outage, not per call: the next call gives up at its first failure
    calls.clear()
    with pytest.raises(StorageUnavailableError):
        with_storage_retries(down, what="write s3://b/k2")
    assert len(calls) == 1
    # and the task-level retry stops too
    assert retry_on_storage_error(None, None, _FailedState(down)) is False


class _FailedState:
    def __init__(self, fn) -> None:
        self.fn = fn

    def result(self):
        self.fn()


def test_a_short_outage_costs_a_pause(budget) -> None:
    failures = [ConnectionRefusedError(111, "refused")] * 2

    def flaky() -> str:
        if failures:
            raise failures.pop()
        return "ok"

    assert with_storage_retries(flaky, what="read s3://b/k") == "ok"
    assert budget.began() is None  # a success ends the outage


def test_permanent_errors_fail_at_once(budget, tmp_path, monkeypatch) -> None:
    calls = []

    def full(*args, **kwargs):
        calls.append(1)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("tasks.storage.os.fdopen", full)
    t0 = time.monotonic()
    with pytest.raises(OSError, match="No space left"):
        with_storage_retries(
            lambda: atomic_write_bytes(str(tmp_path / "x.bin"), b"1234"), what="write x.bin"
        )
    assert len(calls) == 1 and time.monotonic() - t0 < 0.5
    assert list(tmp_path.iterdir()) == []  # the temp file is gone too
    for exc in (PermissionError(errno.EACCES, "denied"), _wrapped(_client_error("x", 403))):
        assert retry_on_storage_error(None, None, _FailedState(_raiser(exc))) is False


def _raiser(exc):
    def fn():
        raise exc

    return fn


def test_task_retries_only_transient_within_the_budget(budget) -> None:
    down = _FailedState(_raiser(ConnectionRefusedError(111, "refused")))
    t0 = time.monotonic()
    while retry_on_storage_error(None, None, down):
        time.sleep(0.25)
        assert time.monotonic() - t0 < 3
    assert 1.5 <= time.monotonic() - t0 < 2.0
    assert retry_on_storage_error(None, None, _FailedState(lambda: 1)) is False
