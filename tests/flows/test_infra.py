"""infra.services against real processes: SeaweedFS, a Prefect server, a process pool + worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from infra import services as sv


def _gone(pid: int) -> bool:
    """The process and its whole process group are gone (zombies count as gone)."""
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return not any(os.getpgid(p.pid) == pid for p in psutil.process_iter() if p.is_running())


def _listen_addrs(pid: int) -> set[str]:
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return {
        c.laddr.ip for p in procs for c in p.net_connections(kind="inet") if c.status == "LISTEN"
    }


def test_seaweedfs_start_is_idempotent_and_stop_kills(tmp_path: Path) -> None:
    s3 = sv.start_seaweedfs(tmp_path)
    try:
        assert s3.endpoint_url.startswith("http://127.0.0.1:")
        assert s3.secret_key not in repr(s3)
        assert _listen_addrs(s3.pid) == {"127.0.0.1"}
        again = sv.start_seaweedfs(tmp_path)
        assert (again.pid, again.endpoint_url, again.secret_key) == (
            s3.pid,
            s3.endpoint_url,
            s3.secret_key,
        )
        record = json.loads(sv.record_path(sv.SEAWEEDFS, tmp_path).read_text())
        assert record["pid"] == s3.pid and s3.secret_key not in json.dumps(record)
        st = sv.status(tmp_path)[sv.SEAWEEDFS]
        assert st.running and st.healthy and st.pid == s3.pid
        assert (tmp_path / "secrets" / "s3_secret_key").stat().st_mode & 0o077 == 0
        with pytest.raises(sv.ServiceError, match="already running"):
            sv.start_seaweedfs(tmp_path, port=1)
    finally:
        assert s3.stop()
    assert _gone(s3.pid)
    assert not sv.record_path(sv.SEAWEEDFS, tmp_path).exists()
    assert not s3.stop()  # nothing left to stop
    assert sv.status(tmp_path) == {}


def test_stale_pid_file_is_not_trusted(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    sdir = tmp_path / "state"
    (sdir / "run").mkdir(parents=True)
    record = {"name": "worker-x", "pid": proc.pid, "pgid": proc.pid, "create_time": 1.0}
    record |= {"api_url": "http://127.0.0.1:9/api", "pool": "x", "worker_name": "w"}
    sv.record_path("worker-x", sdir).write_text(json.dumps(record))
    assert not sv.status(sdir)["worker-x"].running
    assert sv.stop_service("worker-x", sdir) is False
    assert not sv.record_path("worker-x", sdir).exists()


def test_prefect_server_pool_worker(tmp_path: Path) -> None:
    server = sv.start_prefect_server(tmp_path, ui=False)
    worker = None
    try:
        with urllib.request.urlopen(server.api_url + "/health", timeout=5) as resp:
            assert resp.status == 200 and json.loads(resp.read()) is True
        assert server.api_url.startswith("http://127.0.0.1:")
        assert (tmp_path / "prefect" / "prefect.db").exists()  # PREFECT_HOME in the state dir
        assert sv.start_prefect_server(tmp_path).pid == server.pid

        t0 = time.monotonic()
        worker = sv.start_worker(server.api_url, "test-pool", tmp_path, timeout=120)
        elapsed = time.monotonic() - t0
        assert sv.ensure_work_pool(server.api_url, "test-pool", tmp_path) is False
        with urllib.request.urlopen(server.api_url + "/work_pools/test-pool", timeout=5) as resp:
            assert json.loads(resp.read())["type"] == "process"
        assert sv.start_worker(server.api_url, "test-pool", tmp_path).pid == worker.pid
        states = sv.status(tmp_path)
        assert set(states) == {sv.PREFECT_SERVER, "worker-test-pool"}
        assert all(s.running and s.healthy for s in states.values()), states
        assert elapsed < 120
    finally:
        stopped = sv.stop_all(tmp_path)
    assert stopped == {"worker-test-pool": worker is not None, sv.PREFECT_SERVER: True}
    assert _gone(server.pid)
    if worker is not None:
        assert _gone(worker.pid)
    assert sv.status(tmp_path) == {}
