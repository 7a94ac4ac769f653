"""This machine: its CPU's identity (what a measured choice holds for) and the cache where the
pipeline keeps what it measured here (runtime calibrations, search choices, exported models).

``<cache>`` is ``$ANOMALYDINO_CACHE``, else ``~/.cache/anomalydino``. Everything in it is
rebuilt on demand: deleting it costs a measurement or an export, never a result.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

from tasks.storage import atomic_write_bytes

#: CPU flags that decide which runtime is fastest (bf16 and int8 matrix units, vector width).
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def cache_root(environ: Mapping[str, str] = os.environ) -> Path:
    """``$ANOMALYDINO_CACHE``, else ``~/.cache/anomalydino``."""
    return Path(environ.get("ANOMALYDINO_CACHE") or Path.home() / ".cache" / "anomalydino")


def cpu_identity(cpuinfo: str | None = None) -> dict[str, object]:
    """The CPU's model name (as ``lscpu`` shows it) and which of :data:`CPU_FLAGS` it has."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    name = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    flags_line = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    flags = set(flags_line.group(1).split()) if flags_line else set()
    return {
        "model_name": name.group(1).strip() if name else "unknown",
        "flags": [f for f in CPU_FLAGS if f in flags],
    }


def machine_name() -> str:
    """A short, file-safe name of this CPU (its model name and :data:`CPU_FLAGS`)."""
    identity = json.dumps(cpu_identity(), sort_keys=True).encode()
    return hashlib.sha256(identity).hexdigest()[:16]


def write_cache_json(path: Path, data: Mapping[str, object]) -> None:
    """Write a file of the machine cache atomically (rebuilt on demand: no fsync)."""
    atomic_write_bytes(str(path), (json.dumps(data, indent=2) + "\n").encode(), durable=False)
