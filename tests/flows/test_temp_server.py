"""The command's temporary Prefect server: started without Prefect's server modules in the
process, reached by Prefect clients from every thread, gone after ``stop``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import json, sys, threading
from flows import temp_server
from prefect.client.orchestration import get_client

url = temp_server.start()
pid = temp_server.server_pid()
seen = {}

def ask():  # a thread started after ``start``, as Prefect's log and event workers are
    with get_client(sync_client=True) as client:
        seen["thread"] = str(client.api_url)
        seen["healthy"] = client.api_healthcheck() is None

worker = threading.Thread(target=ask)
worker.start()
worker.join()
from prefect.settings import PREFECT_API_URL
during = PREFECT_API_URL.value()
server_modules = "prefect.server.api.server" in sys.modules
temp_server.stop()
print(json.dumps({"url": url, "pid": pid, "seen": seen, "during": during,
                  "after": PREFECT_API_URL.value(), "server_modules": server_modules}))
"""


def test_temporary_server_serves_every_thread_and_stops(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PYTHONPATH": str(REPO),
    }
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, cwd=REPO, capture_output=True, text=True,
        timeout=300, check=True,
    ).stdout  # fmt: skip
    result = json.loads(out.strip().splitlines()[-1])
    assert result["url"].startswith("http://127.0.0.1:") and result["url"].endswith("/api")
    assert result["seen"] == {"thread": result["url"] + "/", "healthy": True}
    assert result["during"] == result["url"]
    assert result["after"] is None  # the environment as it was
    assert not result["server_modules"]  # ~80 MB of Prefect's server stays in the child
    assert not os.path.exists(f"/proc/{result['pid']}")  # stopped and reaped
