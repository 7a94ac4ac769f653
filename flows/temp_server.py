"""The temporary Prefect server of a command, tied to the command's life.

Without ``PREFECT_API_URL`` Prefect starts a temporary API server (``SubprocessASGIServer``: a
uvicorn child process, ~230 MB) and stops it at exit through ``atexit``, which never runs when
the command is killed (``kill -9``, the OOM killer): the server was re-parented to PID 1 and
lived on. Here the command starts the same server (Prefect's command, environment and health
check) itself, from its main thread, with ``PR_SET_PDEATHSIG`` set in the child (Linux
``prctl``): the kernel sends it SIGKILL the moment the command dies, however it dies. Every
Prefect client of the process then reaches it through ``PREFECT_API_URL`` (the process-wide
settings are refreshed), as with a standing server.

Not through ``SubprocessASGIServer`` itself: importing ``prefect.server.api.server`` loads
Prefect's whole server (FastAPI, SQLAlchemy, the database models) into the command's process,
~80 MB of its peak for nothing, as it runs in the child. Elsewhere (no ``prctl``) Prefect's
own start is kept.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

PR_SET_PDEATHSIG = 1
HOST = "127.0.0.1"


def _libc_prctl() -> Any | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _libc_prctl()  # resolved here: a forked child must not load libraries


def die_with_parent(parent_pid: int):
    """A ``preexec_fn``: the child gets SIGKILL when its parent dies (checked once more after
    ``prctl``: a parent that died during the fork is no longer our parent)."""

    def preexec() -> None:
        if _PRCTL is not None:
            _PRCTL(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


def api_url_configured() -> bool:
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _server_command(port: int) -> list[str]:
    """Prefect's own temporary-server command (``SubprocessASGIServer``): uvicorn serving
    ``prefect.server.api.server:create_app`` on 127.0.0.1, errors only."""
    import prefect

    return [
        sys.executable, "-m", "uvicorn",
        "--app-dir", str(prefect.__module_path__.parent),
        "--factory", "prefect.server.api.server:create_app",
        "--host", HOST, "--port", str(port),
        "--log-level", "error", "--lifespan", "on",
    ]  # fmt: skip


def _server_env() -> dict[str, str]:
    """The child's environment, as Prefect gives it: ours, the settings in force, no UI."""
    from prefect.settings import get_current_settings

    return {
        **os.environ,
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
        **get_current_settings().to_environment_variables(exclude_unset=True),
    }


@dataclass
class _Server:
    process: subprocess.Popen
    api_url: str
    previous_url: str | None  # ``PREFECT_API_URL`` in the environment before ours


_OURS: list[_Server] = []  # the servers started by ``start`` (at most one)


def _wait_healthy(process: subprocess.Popen, api_url: str, timeout: float) -> bool:
    """True once ``/health`` answers 200; False if the child exited with 3 (port taken)."""
    import httpx

    deadline = time.monotonic() + timeout
    with httpx.Client() as client:
        while time.monotonic() < deadline:
            code = process.poll()
            if code == 3:
                return False
            if code is not None:
                raise RuntimeError(f"the temporary Prefect server exited with code {code}")
            try:
                if client.get(f"{api_url}/health").status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    process.kill()
    process.wait()
    raise RuntimeError(f"the temporary Prefect server did not answer within {timeout:.0f} s")


def _use_api(url: str | None) -> None:
    """Point every Prefect client of this process (all threads) at ``url`` (None: unset)."""
    from prefect.context import refresh_global_settings_context

    if url is None:
        os.environ.pop("PREFECT_API_URL", None)
    else:
        os.environ["PREFECT_API_URL"] = url
    refresh_global_settings_context()


def start() -> str | None:
    """Start the temporary server now (unless ``PREFECT_API_URL`` is set, or one is already
    running in this process) and point every Prefect client of this process at it. Its URL,
    or None when none was started here. Call from the main thread: the death signal follows
    the thread that started the child."""
    if api_url_configured() or _PRCTL is None:
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    from prefect.settings import get_current_settings

    timeout = float(get_current_settings().server.ephemeral.startup_timeout_seconds)
    env = _server_env()
    for _ in range(10):  # another process may take the free port before uvicorn binds it
        port = _free_port()
        api_url = f"http://{HOST}:{port}/api"
        process = subprocess.Popen(
            _server_command(port), env=env, preexec_fn=die_with_parent(os.getpid())
        )
        if _wait_healthy(process, api_url, timeout):
            break
        process.wait()
    else:
        raise RuntimeError("the temporary Prefect server found no free port")
    _OURS.append(_Server(process, api_url, os.environ.get("PREFECT_API_URL")))
    _use_api(api_url)
    return api_url


def server_pid() -> int | None:
    """The pid of the temporary server started by ``start`` (None if none runs)."""
    return _OURS[-1].process.pid if _OURS else None


def stop() -> None:
    """Send the logs still queued, then stop the temporary server started by ``start`` (if
    any), so that nothing is printed after the command's last line."""
    if not _OURS:
        return
    server = _OURS.pop()
    try:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5, at_exit=False)
    except Exception:
        pass
    server.process.terminate()
    try:
        server.process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
    _use_api(server.previous_url)
