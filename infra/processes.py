"""Process records of the local services: state dir, pid files, locks, start, health wait, stop.

Every service of ``infra/`` runs on 127.0.0.1 only and is started through :func:`spawn`, which
writes ``<state>/run/<name>.json`` (its pid file: pid, process group, start time, ports, urls,
never secrets) and logs to ``<state>/logs/<name>.log``. :func:`stop_service` signals the process
group recorded there, after checking that the pid still belongs to the process started (so a
recycled pid is never killed). Starting a service that is already running returns the running
one (:func:`running_record`). The state directory defaults to ``<repo>/.data/infra`` or
``$ANOMALYDINO_INFRA_DIR``.

The services themselves live in :mod:`infra.seaweedfs`, :mod:`infra.prefect_server` and
:mod:`infra.prefect_worker`; :mod:`infra.stack` starts, stops and reports on all of them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
STATE_DIR_ENV = "ANOMALYDINO_INFRA_DIR"
HOST = "127.0.0.1"

# Popen objects of services started by this process, so that stop() can reap them.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class ServiceError(RuntimeError):
    """A service failed to start, to become healthy, or to stop."""


# --------------------------------------------------------------------------- paths, records


def default_state_dir() -> Path:
    """``$ANOMALYDINO_INFRA_DIR`` or ``<repo>/.data/infra``."""
    env = os.environ.get(STATE_DIR_ENV)
    return Path(env).expanduser().resolve() if env else REPO_ROOT / ".data" / "infra"


def ensure_state(state_dir: str | os.PathLike[str] | None) -> Path:
    """The resolved state dir (default :func:`default_state_dir`) with its ``run``/``logs``."""
    path = Path(state_dir).expanduser().resolve() if state_dir else default_state_dir()
    for sub in ("run", "logs"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


def record_path(name: str, state_dir: Path) -> Path:
    return state_dir / "run" / f"{name}.json"


def log_path(name: str, state_dir: Path) -> Path:
    return state_dir / "logs" / f"{name}.log"


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_record(name: str, state_dir: Path) -> dict[str, Any] | None:
    path = record_path(name, state_dir)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ServiceError(f"{name}: unreadable pid file {path}: {exc}") from exc


@contextlib.contextmanager
def lock(name: str, state_dir: Path) -> Iterator[None]:
    """Serialise start/stop of one service across processes."""
    with open(state_dir / "run" / f"{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def alive(record: Mapping[str, Any]) -> bool:
    """True if the recorded process still runs and is the one we started (not a reused pid)."""
    pid = int(record["pid"])
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        _CHILDREN.pop(pid, None)
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(proc.create_time() - float(record["create_time"])) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Only zombies left (e.g. our own unreaped children) count as dead.
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return "(no log)"
    return "\n".join(text)


def http_ok(url: str, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def http_json(
    method: str, url: str, body: Any | None = None, timeout: float = 10.0
) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            payload = resp.read()
            return resp.status, json.loads(payload) if payload else None
    except urllib.error.HTTPError as exc:
        return exc.code, None


# --------------------------------------------------------------------------- generic lifecycle


def spawn(
    name: str,
    argv: list[str],
    state_dir: Path,
    *,
    env: Mapping[str, str],
    info: Mapping[str, Any],
    cwd: Path | None = None,
) -> dict[str, Any]:
    """Start ``argv`` in its own session, logging to the state dir, and write its pid file."""
    log = log_path(name, state_dir)
    with open(log, "ab") as fh:
        fh.write(f"\n--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting {name}\n".encode())
        fh.flush()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd or state_dir,
            start_new_session=True,
        )
    _CHILDREN[proc.pid] = proc
    record = {
        "name": name,
        "pid": proc.pid,
        "pgid": proc.pid,
        "create_time": psutil.Process(proc.pid).create_time(),
        "argv": argv,
        "log": str(log),
        **info,
    }
    write_atomic(record_path(name, state_dir), json.dumps(record, indent=2) + "\n")
    return record


def wait_healthy(
    name: str,
    record: Mapping[str, Any],
    state_dir: Path,
    check: Callable[[], bool],
    timeout: float,
    *,
    owned: bool,
) -> None:
    """Poll ``check`` until it passes; raise on death or timeout.

    On timeout a process started by this call (``owned``) is stopped; one found already running
    is left alone.
    """
    deadline = time.monotonic() + timeout
    while True:
        if not alive(record):
            _remove_record(name, state_dir)
            raise ServiceError(
                f"{name}: process {record['pid']} exited during startup; "
                f"log {log_path(name, state_dir)}:\n{_log_tail(log_path(name, state_dir))}"
            )
        if check():
            return
        if time.monotonic() > deadline:
            if owned:
                _terminate(record, timeout=10.0)
                _remove_record(name, state_dir)
            raise ServiceError(
                f"{name}: pid {record['pid']} not healthy after {timeout:.0f}s"
                f"{', stopped it' if owned else ''}; "
                f"log {log_path(name, state_dir)}:\n{_log_tail(log_path(name, state_dir))}"
            )
        time.sleep(0.25)


def _remove_record(name: str, state_dir: Path) -> None:
    """Drop the pid file of a dead service and the leftovers it lists (e.g. unix sockets)."""
    path = record_path(name, state_dir)
    try:
        leftovers = json.loads(path.read_text()).get("cleanup", [])
    except (OSError, ValueError):
        leftovers = []
    for item in leftovers:
        Path(item).unlink(missing_ok=True)
    path.unlink(missing_ok=True)


def _terminate(record: Mapping[str, Any], timeout: float) -> None:
    """SIGTERM the process group, wait, then SIGKILL whatever is left; reap our own child."""
    pid, pgid = int(record["pid"]), int(record["pgid"])
    child = _CHILDREN.pop(pid, None)

    def gone() -> bool:
        if child is not None:
            child.poll()
        return not _group_alive(pgid)

    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if gone():
                return
            time.sleep(0.1)
    raise ServiceError(f"{record['name']}: process group {pgid} survived SIGKILL")


def stop_service(
    name: str, state_dir: str | os.PathLike[str] | None = None, *, timeout: float = 20.0
) -> bool:
    """Stop service ``name`` by its recorded process group; True if something was running."""
    sdir = ensure_state(state_dir)
    with lock(name, sdir):
        record = read_record(name, sdir)
        if record is None:
            return False
        was_running = alive(record)
        if was_running:
            _terminate(record, timeout=timeout)
        _remove_record(name, sdir)
        return was_running


def running_record(name: str, state_dir: Path) -> dict[str, Any] | None:
    """The live record of ``name``, removing a stale pid file."""
    record = read_record(name, state_dir)
    if record is None:
        return None
    if alive(record):
        return record
    _remove_record(name, state_dir)
    return None


def check_port(name: str, record: Mapping[str, Any], key: str, wanted: int | None) -> None:
    if wanted is not None and int(record[key]) != wanted:
        raise ServiceError(
            f"{name}: already running (pid {record['pid']}) on port {record[key]}, "
            f"not on the requested port {wanted}; stop it first"
        )
