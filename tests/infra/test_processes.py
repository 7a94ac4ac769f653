"""infra.processes: pid files are trusted only while they name the process that was started."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from infra.processes import record_path, stop_service
from infra.stack import status


def test_stale_pid_file_is_not_trusted(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    sdir = tmp_path / "state"
    (sdir / "run").mkdir(parents=True)
    record = {"name": "worker-x", "pid": proc.pid, "pgid": proc.pid, "create_time": 1.0}
    record |= {"api_url": "http://127.0.0.1:9/api", "pool": "x", "worker_name": "w"}
    record_path("worker-x", sdir).write_text(json.dumps(record))
    assert not status(sdir)["worker-x"].running
    assert stop_service("worker-x", sdir) is False
    assert not record_path("worker-x", sdir).exists()
