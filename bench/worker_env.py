"""What a bench process that runs the flows in-process sets first, as the ``anomalydino`` command
does: offline, quiet Prefect settings."""

from __future__ import annotations

import os
import sys
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
