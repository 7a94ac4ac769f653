"""A process work pool on the Prefect server and ``prefect worker start`` polling it.

The worker runs as service ``worker-<pool>`` (pid file and log as in :mod:`infra.processes`),
in the repository root unless ``cwd`` is given, and counts as healthy once the server lists it
ONLINE with a heartbeat since its start. Pool names: letters, digits, ``.``, ``_``, ``-``.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from infra.prefect_server import prefect_binary, prefect_env
from infra.processes import (
    REPO_ROOT,
    ServiceError,
    ensure_state,
    http_json,
    lock,
    running_record,
    spawn,
    stop_service,
    wait_healthy,
)

DEFAULT_POOL = "anomalydino-process"

_POOL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def worker_service_name(pool: str) -> str:
    return f"worker-{pool}"


@dataclass(frozen=True)
class PrefectWorker:
    """A running Prefect process worker polling ``pool``."""

    api_url: str
    pool: str
    name: str
    pid: int
    state_dir: Path

    def stop(self, timeout: float = 20.0) -> bool:
        return stop_service(worker_service_name(self.pool), self.state_dir, timeout=timeout)


def _check_pool_name(pool: str) -> None:
    if not _POOL_RE.match(pool):
        raise ValueError(f"work pool name {pool!r}: use letters, digits, '.', '_', '-' only")


def ensure_work_pool(
    api_url: str, pool: str, state_dir: str | os.PathLike[str] | None = None
) -> bool:
    """Create process work pool ``pool`` on ``api_url`` if missing; True if it was created."""
    _check_pool_name(pool)
    quoted = urllib.parse.quote(pool, safe="")
    code, body = http_json("GET", f"{api_url}/work_pools/{quoted}")
    if code == 200:
        if body and body.get("type") != "process":
            raise ServiceError(f"work pool {pool!r} exists with type {body.get('type')!r}")
        return False
    if code != 404:
        raise ServiceError(f"work pool {pool!r}: GET {api_url}/work_pools answered {code}")
    sdir = ensure_state(state_dir)
    env = {**os.environ, **prefect_env(api_url, sdir)}
    proc = subprocess.run(
        [prefect_binary(), "work-pool", "create", "--type", "process", pool],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        code, _ = http_json("GET", f"{api_url}/work_pools/{quoted}")
        if code == 200:  # created concurrently by someone else
            return False
        raise ServiceError(
            f"work pool {pool!r}: 'prefect work-pool create' failed ({proc.returncode}): "
            f"{(proc.stderr or proc.stdout).strip()[-2000:]}"
        )
    return True


def worker_online(api_url: str, pool: str, name: str, since: float) -> bool:
    quoted = urllib.parse.quote(pool, safe="")
    try:
        code, workers = http_json("POST", f"{api_url}/work_pools/{quoted}/workers/filter", {})
    except (urllib.error.URLError, OSError, ValueError):
        return False
    if code != 200 or not workers:
        return False
    from datetime import datetime

    for w in workers:
        if w.get("name") != name or w.get("status") != "ONLINE" or not w.get("last_heartbeat_time"):
            continue
        beat = datetime.fromisoformat(w["last_heartbeat_time"].replace("Z", "+00:00")).timestamp()
        if beat >= since - 2.0:
            return True
    return False


def start_worker(
    api_url: str,
    pool: str = DEFAULT_POOL,
    state_dir: str | os.PathLike[str] | None = None,
    *,
    name: str | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float = 90.0,
) -> PrefectWorker:
    """Ensure process pool ``pool`` exists and start (or find running) a worker for it.

    Healthy once the server lists the worker ONLINE with a heartbeat since its start.
    """
    _check_pool_name(pool)
    sdir = ensure_state(state_dir)
    service = worker_service_name(pool)
    with lock(service, sdir):
        record = running_record(service, sdir)
        if record is not None and record["api_url"] != api_url:
            raise ServiceError(
                f"{service}: already running (pid {record['pid']}) against {record['api_url']}, "
                f"not {api_url}; stop it first"
            )
        owned = record is None
        if record is None:
            ensure_work_pool(api_url, pool, sdir)
            wname = name or f"{pool}-{socket.gethostname()}"
            argv = [prefect_binary(), "worker", "start", "--pool", pool, "--name", wname]
            argv += ["--type", "process", "--install-policy", "never"]
            env = {**os.environ, **prefect_env(api_url, sdir)}
            info = {"api_url": api_url, "pool": pool, "worker_name": wname, "started": time.time()}
            workdir = Path(cwd) if cwd else REPO_ROOT
            record = spawn(service, argv, sdir, env=env, info=info, cwd=workdir)
        rec = record
        wait_healthy(
            service,
            rec,
            sdir,
            lambda: worker_online(api_url, pool, rec["worker_name"], rec["started"]),
            timeout,
            owned=owned,
        )
        return PrefectWorker(
            api_url=api_url,
            pool=pool,
            name=rec["worker_name"],
            pid=int(rec["pid"]),
            state_dir=sdir,
        )
