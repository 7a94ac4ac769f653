"""What a bench process that runs the flows in-process sets first, as the ``anomalydino`` command
does: offline, quiet Prefect settings."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ENV_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "PREFECT_LOGGING_LEVEL": "WARNING",
}


def prepare_process() -> None:
    """Environment defaults and the repository importable."""
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


@contextmanager
def command_server() -> Iterator[None]:
    """The temporary Prefect server, started and stopped as the command does (``flows.
    temp_server``; nothing with ``PREFECT_API_URL`` set): the measured process is the command's."""
    from flows import temp_server

    temp_server.start()
    try:
        yield
    finally:
        temp_server.stop()
