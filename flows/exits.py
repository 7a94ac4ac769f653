"""How a command ends: one exit code and, on failure, one last ``error:`` line.

=====  ====================================================================================
code   meaning
=====  ====================================================================================
0      done
1      the run failed (storage unreachable past the retry budget, disk full, permission
       denied, a bug): ``error: <what, with its URI>: <cause>``; details in a log file
2      bad input or configuration (a product/lot/shipment/version name, the config, the
       weights, a missing lot): refused with ``error: ...``, before any flow run when it can
       be told from the command line and the config alone
3      partial: the run completed and wrote its report, but some images are error rows
=====  ====================================================================================

Names and the configuration are checked before Prefect is even imported (``preflight``, well
under 2 s). During the run the console shows Prefect's log lines one line each, without
tracebacks; the full log, tracebacks included, goes to a file that is kept only when the
command fails (``$ANOMALYDINO_LOG_DIR``, default ``~/.cache/anomalydino/logs``, the newest 20).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

OK, FAILED, BAD_INPUT, PARTIAL = 0, 1, 2, 3
INTERRUPTED = 130
NAME_ARGS = ("product", "lot", "shipment", "version")
NO_FLOW_COMMANDS = frozenset({"show-bank", "config", "report", "export"})
KEEP_LOGS = 20
_DETAILS = logging.getLogger("anomalydino.cli")  # to the log file only


def n_error_rows(result: Any) -> int:
    """Error rows in a command's result (a run summary, a list of them, a re-evaluation)."""
    if isinstance(result, list | tuple):
        return sum(n_error_rows(r) for r in result)
    lots = getattr(result, "lots", None)
    if isinstance(lots, list):
        return n_error_rows(lots)
    return int(getattr(result, "n_errors", 0) or 0)


def outcome(result: Any) -> int:
    """``PARTIAL`` when the completed run holds error rows, else ``OK``."""
    return PARTIAL if n_error_rows(result) else OK


def is_input_error(exc: BaseException) -> bool:
    """Bad input or configuration (exit code 2), told apart without importing torch."""
    if isinstance(exc, ValueError | FileNotFoundError):
        return True
    return any(cls.__name__ == "WeightsUnavailableError" for cls in type(exc).__mro__)


def preflight(args: argparse.Namespace) -> None:
    """Refuse bad names and a bad configuration before anything starts (no Prefect, no torch):
    raises ``ValueError`` (or ``FileNotFoundError`` for a missing config file)."""
    from tasks.layout import check_name

    for kind in NAME_ARGS:
        value = getattr(args, kind, None)
        for name in value if isinstance(value, list) else [value]:
            if name is not None:
                check_name(kind, name)
    if hasattr(args, "config"):  # every command with settings
        from flows.commands import load_config

        load_config(args)
    extra: Callable[[argparse.Namespace], None] | None = getattr(args, "preflight", None)
    if extra is not None:
        extra(args)


# ------------------------------------------------------------------------------ logging


def _one_line(format_record: Callable[[logging.LogRecord], str]):
    def format_one_line(record: logging.LogRecord) -> str:
        plain = copy.copy(record)  # the log file still gets the traceback
        plain.msg = " ".join(record.getMessage().split())
        plain.args = None
        plain.exc_info = plain.exc_text = plain.stack_info = None
        return format_record(plain)

    return format_one_line


class _Logging:
    """Console handlers print one line per record; every record goes to a log file."""

    def __init__(self, command: str) -> None:
        self.path: Path | None = None
        self._file: logging.Handler | None = None
        self._wrapped: list[logging.Handler] = []
        self._command = command

    def __enter__(self) -> _Logging:
        for name in ("", "prefect._internal", "uvicorn", "fastapi"):
            for handler in logging.getLogger(name).handlers:
                console = isinstance(handler, logging.StreamHandler) and not isinstance(
                    handler, logging.FileHandler
                )
                if console and "format" not in vars(handler):
                    handler.format = _one_line(handler.format)  # type: ignore[method-assign]
                    self._wrapped.append(handler)
        folder = Path(
            os.environ.get("ANOMALYDINO_LOG_DIR")
            or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
            / "anomalydino"
            / "logs"
        )
        try:
            folder.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            self.path = folder / f"{self._command}-{stamp}-{os.getpid()}.log"
            self._file = logging.FileHandler(self.path, delay=True, encoding="utf-8")
        except OSError:
            self.path = self._file = None
            return self
        self._file.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s %(threadName)s: %(message)s")
        )
        logging.getLogger().addHandler(self._file)
        _DETAILS.addHandler(self._file)
        _DETAILS.propagate = False
        _DETAILS.setLevel(logging.DEBUG)
        return self

    def close(self, keep: bool) -> Path | None:
        for handler in self._wrapped:
            vars(handler).pop("format", None)
        if self._file is None:
            return None
        logging.getLogger().removeHandler(self._file)
        _DETAILS.removeHandler(self._file)
        self._file.close()
        path = self.path
        if path is None or not keep or not path.exists():
            if path is not None:
                path.unlink(missing_ok=True)
            return None
        logs = sorted(path.parent.glob("*.log"), key=lambda p: p.stat().st_mtime)
        for old in logs[:-KEEP_LOGS]:
            old.unlink(missing_ok=True)
        return path


def _message(exc: BaseException, one_line: Callable[[BaseException], str]) -> str:
    """One line; a pydantic validation error as ``field: problem; ...``."""
    errors = getattr(exc, "errors", None)
    if callable(errors) and type(exc).__name__ == "ValidationError":
        try:
            parts = [
                f"{'.'.join(str(p) for p in e.get('loc', ())) or 'config'}: {e.get('msg')}"
                for e in errors()
            ]
            return f"invalid configuration: {'; '.join(parts)}"
        except Exception:
            pass
    return one_line(exc)


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command: preflight, the temporary Prefect server (dies with this
    process), the command; then the exit code and, on failure, one last ``error:`` line."""
    from tasks.retry import OUTAGE, is_transient, one_line

    error: str | None = None
    try:
        preflight(args)
    except Exception as exc:
        print(f"error: {_message(exc, one_line)}", file=sys.stderr, flush=True)
        return BAD_INPUT if is_input_error(exc) else FAILED
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()  # Prefect's console handler first: it skips the root if one exists
    logs = _Logging(args.command).__enter__()
    try:
        if args.command not in NO_FLOW_COMMANDS:
            from flows import temp_server

            temp_server.start()
        rc = int(args.func(args) or 0)
    except KeyboardInterrupt:
        rc, error = INTERRUPTED, "interrupted"
    except Exception as exc:
        if is_input_error(exc):
            rc = BAD_INPUT
        else:
            rc = FAILED
            _DETAILS.error("%s failed", args.command, exc_info=exc)
        error = _message(exc, one_line)
        if rc == FAILED and is_transient(exc):  # the retry budget ran out on this one
            error = (
                f"storage unavailable (retries stop {OUTAGE.budget:.0f}s into an outage): {error}"
            )
    finally:
        if "flows.temp_server" in sys.modules:
            sys.modules["flows.temp_server"].stop()
    kept = logs.close(keep=rc == FAILED)
    if error is not None:
        details = f" (details: {kept})" if kept else ""
        print(f"error: {error}{details}", file=sys.stderr, flush=True)
    return rc
