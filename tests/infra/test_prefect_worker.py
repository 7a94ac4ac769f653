"""infra.prefect_worker (work pool + process worker) and the infra.prefect_server it needs,
against real processes; one server start serves both."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

from infra.prefect_server import PREFECT_SERVER, start_prefect_server
from infra.prefect_worker import ensure_work_pool, start_worker, worker_service_name
from infra.stack import status, stop_all
from tests.infra.process_checks import gone

POOL = "test-pool"


def test_prefect_server_pool_worker(tmp_path: Path) -> None:
    server = start_prefect_server(tmp_path, ui=False)
    worker = None
    try:
        with urllib.request.urlopen(server.api_url + "/health", timeout=5) as resp:
            assert resp.status == 200 and json.loads(resp.read()) is True
        assert server.api_url.startswith("http://127.0.0.1:")
        assert (tmp_path / "prefect" / "prefect.db").exists()  # PREFECT_HOME in the state dir
        assert start_prefect_server(tmp_path).pid == server.pid

        t0 = time.monotonic()
        worker = start_worker(server.api_url, POOL, tmp_path, timeout=120)
        elapsed = time.monotonic() - t0
        assert ensure_work_pool(server.api_url, POOL, tmp_path) is False
        with urllib.request.urlopen(f"{server.api_url}/work_pools/{POOL}", timeout=5) as resp:
            assert json.loads(resp.read())["type"] == "process"
        assert start_worker(server.api_url, POOL, tmp_path).pid == worker.pid
        states = status(tmp_path)
        assert set(states) == {PREFECT_SERVER, worker_service_name(POOL)}
        assert all(s.running and s.healthy for s in states.values()), states
        assert elapsed < 120
    finally:
        stopped = stop_all(tmp_path)
    assert stopped == {worker_service_name(POOL): worker is not None, PREFECT_SERVER: True}
    assert gone(server.pid)
    if worker is not None:
        assert gone(worker.pid)
    assert status(tmp_path) == {}
