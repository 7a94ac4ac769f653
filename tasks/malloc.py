"""The process's allocator decision, read from the environment (no torch, so that
``cap_arenas_at_start`` can run before any import that starts threads;
``anomalydino_core.allocator`` applies it)."""

from __future__ import annotations

import os
from collections.abc import Mapping

from anomalydino_core.allocator import cap_arenas


def malloc_tuning_wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """False when ``ANOMALYDINO_MALLOC_TUNING`` is 0 / false / no (glibc's defaults stay)."""
    value = environ.get("ANOMALYDINO_MALLOC_TUNING", "1")
    return value.strip().lower() not in ("0", "false", "no")


def cap_arenas_at_start(environ: Mapping[str, str] = os.environ) -> bool:
    """Cap glibc's malloc arenas first thing in a process (``anomalydino_core.allocator``:
    -0.11 to -0.14 GiB peak RSS of an audit), unless the tuning is off or the environment already
    sets ``MALLOC_ARENA_MAX`` (glibc read it at start). True when capped here.

    Opt-in, for a process of one's own: the ``anomalydino`` command does not call it. With the
    cap from its start, the S3-outage test's process took 27-35 s to fail instead of 25 on the
    AMD EPYC (5 runs against 2; once 10 s from its last line to its exit); on the Intel Xeon
    (AMX), 3 runs each alternating, 24.2-27.3 s with the cap and 24.1-27.0 without."""
    if not malloc_tuning_wanted(environ) or "MALLOC_ARENA_MAX" in environ:
        return False
    return cap_arenas()
