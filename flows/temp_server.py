"""The temporary Prefect server of a command, tied to the command's life.

Without ``PREFECT_API_URL`` Prefect starts a temporary API server (``SubprocessASGIServer``: a
uvicorn child process, ~230 MB) and stops it at exit through ``atexit``, which never runs when
the command is killed (``kill -9``, the OOM killer): the server was re-parented to PID 1 and
lived on. Here the command starts that server itself, from its main thread, with
``PR_SET_PDEATHSIG`` set in the child (Linux ``prctl``): the kernel sends it SIGKILL the moment
the command dies, however it dies. Elsewhere (no ``prctl``) Prefect's own start is kept.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
from typing import Any

PR_SET_PDEATHSIG = 1
_OURS: list[Any] = []  # the servers started by ``start`` (at most one)


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


class _GuardedSubprocess:
    """``subprocess`` as seen by Prefect's server module while it starts the server: ``Popen``
    with ``die_with_parent`` (everything else is the real module)."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def Popen(self, *args: Any, **kwargs: Any) -> subprocess.Popen:  # noqa: N802
        kwargs.setdefault("preexec_fn", die_with_parent(os.getpid()))
        return self._real.Popen(*args, **kwargs)


def _server_class() -> type:
    from prefect.server.api import server as prefect_server

    class GuardedServer(prefect_server.SubprocessASGIServer):
        """Prefect's temporary server, started so that it dies with this process."""

        def _run_uvicorn_command(self) -> subprocess.Popen:
            real = prefect_server.subprocess
            prefect_server.subprocess = _GuardedSubprocess(real)  # type: ignore[assignment]
            try:
                return super()._run_uvicorn_command()
            finally:
                prefect_server.subprocess = real

    return GuardedServer


def api_url_configured() -> bool:
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


def start() -> str | None:
    """Start the temporary server now (unless ``PREFECT_API_URL`` is set, or one is already
    running in this process) so that every Prefect client of this process uses it. Its URL,
    or None when none was started here. Call from the main thread: the death signal follows
    the thread that started the child."""
    if api_url_configured() or _PRCTL is None:
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    from prefect.server.api.server import SubprocessASGIServer

    instances = SubprocessASGIServer._instances
    current = instances.get(None)
    if current is not None and current.running:
        return None
    instances.pop(None, None)
    server = _server_class()()  # registered as the default (port None) instance
    server.start()
    _OURS.append(server)
    return server.api_url


def server_pid() -> int | None:
    """The pid of the temporary server started by ``start`` (None if none runs)."""
    process = getattr(_OURS[-1], "server_process", None) if _OURS else None
    return None if process is None else process.pid


def stop() -> None:
    """Send the logs still queued, then stop the temporary server started by ``start`` (if
    any), so that nothing is printed after the command's last line."""
    if not _OURS:
        return
    server = _OURS.pop()
    if getattr(server, "server_process", None) is None:
        return
    try:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5, at_exit=False)
    except Exception:
        pass
    server.stop()
