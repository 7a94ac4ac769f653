"""What a bench process that runs the flows in-process sets first, as the ``anomalydino`` command
and the deployments do: offline, quiet Prefect settings and glibc's malloc arenas capped."""

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
    """Environment defaults, the repository importable, the arenas capped (before any thread)."""
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tasks.malloc import cap_arenas_at_start

    cap_arenas_at_start()
