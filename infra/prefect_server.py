"""The Prefect API server on 127.0.0.1.

``prefect server start`` with ``PREFECT_HOME=<state>/prefect`` (its database lives there),
analytics off, healthy once ``/api/health`` answers. Its pid file and log are kept as described
in :mod:`infra.processes`; the work pool and worker that run deployments on it are in
:mod:`infra.prefect_worker`.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from infra.processes import (
    HOST,
    ServiceError,
    check_port,
    ensure_state,
    free_ports,
    http_ok,
    lock,
    running_record,
    spawn,
    stop_service,
    wait_healthy,
)

PREFECT_SERVER = "prefect-server"

QUIET_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}


def prefect_env(api_url: str, state_dir: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Environment variables for Prefect commands/clients talking to ``api_url``."""
    env = {"PREFECT_API_URL": api_url, **QUIET_ENV}
    if state_dir is not None:
        env["PREFECT_HOME"] = str(Path(state_dir) / "prefect")
    return env


@dataclass(frozen=True)
class PrefectServer:
    """A running Prefect API server."""

    api_url: str
    pid: int
    state_dir: Path

    def env(self) -> dict[str, str]:
        """Environment for Prefect clients of this server (see :func:`prefect_env`)."""
        return prefect_env(self.api_url, self.state_dir)

    def stop(self, timeout: float = 20.0) -> bool:
        return stop_service(PREFECT_SERVER, self.state_dir, timeout=timeout)


def prefect_binary() -> str:
    candidate = Path(sys.executable).parent / "prefect"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("prefect")
    if not found:
        raise ServiceError("prefect: no 'prefect' executable next to the interpreter or on PATH")
    return found


def prefect_healthy(api_url: str) -> bool:
    return http_ok(api_url + "/health")


def start_prefect_server(
    state_dir: str | os.PathLike[str] | None = None,
    port: int | None = None,
    *,
    ui: bool = True,
    timeout: float = 120.0,
) -> PrefectServer:
    """Start (or find running) a Prefect server on 127.0.0.1:``port``; waits for /api/health."""
    sdir = ensure_state(state_dir)
    with lock(PREFECT_SERVER, sdir):
        record = running_record(PREFECT_SERVER, sdir)
        owned = record is None
        if record is None:
            port = port or free_ports(1)[0]
            home = sdir / "prefect"
            home.mkdir(parents=True, exist_ok=True)
            api_url = f"http://{HOST}:{port}/api"
            argv = [prefect_binary(), "server", "start", "--host", HOST, "--port", str(port)]
            argv += ["--analytics-off", "--ui" if ui else "--no-ui"]
            env = {**os.environ, "PREFECT_HOME": str(home), **QUIET_ENV}
            env.pop("PREFECT_API_URL", None)
            info = {"url": api_url, "port": port}
            record = spawn(PREFECT_SERVER, argv, sdir, env=env, info=info)
        else:
            check_port(PREFECT_SERVER, record, "port", port)
        api_url = record["url"]
        check = lambda: prefect_healthy(api_url)  # noqa: E731
        wait_healthy(PREFECT_SERVER, record, sdir, check, timeout, owned=owned)
        return PrefectServer(api_url=api_url, pid=int(record["pid"]), state_dir=sdir)


def running_prefect_server(state_dir: str | os.PathLike[str] | None = None) -> PrefectServer | None:
    """The running Prefect server of ``state_dir``, if any (no start)."""
    sdir = ensure_state(state_dir)
    record = running_record(PREFECT_SERVER, sdir)
    if record is None:
        return None
    return PrefectServer(api_url=record["url"], pid=int(record["pid"]), state_dir=sdir)
