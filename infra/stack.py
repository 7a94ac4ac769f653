"""All local services together: start them, stop them in order, report their status.

Services (each in its own module, all on 127.0.0.1, pid files and logs as in
:mod:`infra.processes`):

* ``seaweedfs`` (:mod:`infra.seaweedfs`): ``weed mini``, the S3 endpoint.
* ``prefect-server`` (:mod:`infra.prefect_server`): ``prefect server start``.
* ``worker-<pool>`` (:mod:`infra.prefect_worker`): a process work pool on that server and
  ``prefect worker start``.

Stop order is workers first, then the server, then SeaweedFS.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from infra.prefect_server import (
    PREFECT_SERVER,
    PrefectServer,
    prefect_healthy,
    start_prefect_server,
)
from infra.prefect_worker import DEFAULT_POOL, PrefectWorker, start_worker, worker_online
from infra.processes import alive, ensure_state, log_path, read_record, stop_service
from infra.seaweedfs import SEAWEEDFS, S3Service, s3_credentials, s3_healthy, start_seaweedfs


@dataclass(frozen=True)
class ServiceStatus:
    """What ``status`` knows about one service."""

    name: str
    pid: int | None
    running: bool
    healthy: bool
    url: str | None
    log: Path


@dataclass(frozen=True)
class Stack:
    """All services started by :func:`start_all`."""

    s3: S3Service | None
    server: PrefectServer | None
    worker: PrefectWorker | None

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.s3 is not None:
            out.update(self.s3.env())
        if self.server is not None:
            out.update(self.server.env())
        return out


def start_all(
    state_dir: str | os.PathLike[str] | None = None,
    *,
    s3_port: int | None = None,
    prefect_port: int | None = None,
    pool: str = DEFAULT_POOL,
    seaweedfs: bool = True,
    prefect: bool = True,
    worker: bool = True,
    ui: bool = True,
) -> Stack:
    """Start SeaweedFS, the Prefect server and a worker (each optional), reusing running ones."""
    s3 = start_seaweedfs(state_dir, s3_port) if seaweedfs else None
    server = start_prefect_server(state_dir, prefect_port, ui=ui) if prefect or worker else None
    wk = start_worker(server.api_url, pool, state_dir) if worker and server else None
    return Stack(s3=s3, server=server, worker=wk)


def service_names(state_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Names of all services with a pid file, workers first (stop order)."""
    sdir = ensure_state(state_dir)
    names = sorted(p.stem for p in (sdir / "run").glob("*.json"))
    order = {PREFECT_SERVER: 1, SEAWEEDFS: 2}
    return sorted(names, key=lambda n: (order.get(n, 0), n))


def stop_all(state_dir: str | os.PathLike[str] | None = None, *, timeout: float = 20.0) -> dict:
    """Stop every recorded service (workers, then the server, then SeaweedFS)."""
    return {n: stop_service(n, state_dir, timeout=timeout) for n in service_names(state_dir)}


def status(state_dir: str | os.PathLike[str] | None = None) -> dict[str, ServiceStatus]:
    """Liveness and health of every service that has a pid file."""
    sdir = ensure_state(state_dir)
    out: dict[str, ServiceStatus] = {}
    for name in service_names(sdir):
        record = read_record(name, sdir)
        if record is None:
            continue
        running = alive(record)
        healthy = False
        if running and name == SEAWEEDFS:
            key, secret = s3_credentials(sdir)
            healthy = s3_healthy(record["url"], key, secret)
        elif running and name == PREFECT_SERVER:
            healthy = prefect_healthy(record["url"])
        elif running:
            healthy = worker_online(
                record["api_url"], record["pool"], record["worker_name"], time.time() - 90.0
            )
        out[name] = ServiceStatus(
            name=name,
            pid=int(record["pid"]),
            running=running,
            healthy=healthy,
            url=record.get("url") or record.get("api_url"),
            log=log_path(name, sdir),
        )
    return out
