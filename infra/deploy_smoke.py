"""Deploy prefect.yaml to a local Prefect server and run a deployment through a process worker.

    python -m infra.deploy_smoke [--state-dir DIR] [--root DIR] [--deployment NAME] [--keep]

Offline end to end: starts (or reuses) the Prefect server and the process worker of ``infra/`` on
127.0.0.1, runs ``prefect --no-prompt deploy --all`` from the repository root, prepares a small
bottle lot and reference set under ``--root`` (copied from ../shared/data/mvtec_ad; 3 references,
6 lot images), triggers the nightly-audit deployment now with a JSON ``config`` parameter, waits
for the flow run to finish, and prints its state and the report it wrote. Services it started are
stopped at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from infra.prefect_server import (
    prefect_binary,
    prefect_env,
    running_prefect_server,
    start_prefect_server,
)
from infra.prefect_worker import DEFAULT_POOL, start_worker, worker_service_name
from infra.processes import REPO_ROOT, default_state_dir, stop_service
from infra.stack import status

REPO = REPO_ROOT
DEFAULT_DEPLOYMENT = "nightly-audit/nightly"
MVTEC = Path(os.environ.get("ANOMALYDINO_MVTEC_ROOT", REPO.parent / "shared" / "data" / "mvtec_ad"))


@dataclass(frozen=True)
class SmokeResult:
    deployment: str
    flow_run_id: str
    state: str
    seconds: float
    reports: list[str]


def prepare_data(root: Path, mvtec: Path = MVTEC) -> None:
    """A reference set (v1: 3 train/good images) and one lot (2 good + 4 defective images)."""
    src = mvtec / "bottle"
    refs = root / "references" / "bottle" / "v1"
    lot = root / "incoming" / "bottle" / "lot-smoke"
    refs.mkdir(parents=True, exist_ok=True)
    for name in ("000.png", "001.png", "002.png"):
        shutil.copyfile(src / "train" / "good" / name, refs / name)
    for kind, name in (
        ("good", "000.png"),
        ("good", "001.png"),
        ("broken_large", "000.png"),
        ("broken_small", "000.png"),
        ("contamination", "000.png"),
        ("contamination", "001.png"),
    ):
        (lot / kind).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / "test" / kind / name, lot / kind / name)


def smoke_config(root: Path) -> dict:
    """A small, fast pipeline config (efficientnet_lite0 at 224) as a JSON flow parameter."""
    return {
        "root": str(root),
        "model": {"backbone": "efficientnet_lite0", "resolution": 224},
        "runtime": {"chunk_size": 4},
        "products": {"bottle": {"rotation": "informed"}},
    }


def deploy(api_url: str, state_dir: Path) -> str:
    """``prefect --no-prompt deploy --all`` from the repository root; returns its output."""
    env = {**os.environ, **prefect_env(api_url, state_dir)}
    proc = subprocess.run(
        [prefect_binary(), "--no-prompt", "deploy", "--all"],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"prefect deploy failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc.stdout


def run_and_wait(api_url: str, deployment: str, parameters: dict, timeout: float) -> SmokeResult:
    """Create a flow run of ``deployment`` now and wait for a final state."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    t0 = time.monotonic()
    with temporary_settings({PREFECT_API_URL: api_url}):  # wins over any outer Prefect context
        flow_run = run_deployment(
            deployment, parameters=parameters, timeout=timeout, poll_interval=2
        )
    state = flow_run.state.type.value if flow_run.state else "UNKNOWN"
    return SmokeResult(deployment, str(flow_run.id), state, time.monotonic() - t0, [])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infra.deploy_smoke", description=__doc__)
    p.add_argument("--state-dir", default=None, help="infra state dir (default .data/infra)")
    p.add_argument("--root", default=None, help="pipeline root for the run (default: a temp dir)")
    p.add_argument("--deployment", default=DEFAULT_DEPLOYMENT)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--keep", action="store_true", help="leave the services running")
    args = p.parse_args(argv)
    for key, value in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}.items():
        os.environ.setdefault(key, value)
    state_dir = Path(args.state_dir).resolve() if args.state_dir else default_state_dir()
    root = Path(args.root or tempfile.mkdtemp(prefix="anomalydino-smoke-")).resolve()
    had_server = running_prefect_server(state_dir) is not None
    worker_name = worker_service_name(DEFAULT_POOL)
    had_worker = bool(getattr(status(state_dir).get(worker_name), "running", False))
    server = start_prefect_server(state_dir, ui=False)
    try:
        start_worker(server.api_url, DEFAULT_POOL, state_dir)
        print(f"prefect server {server.api_url}, worker on pool {DEFAULT_POOL}")
        deploy(server.api_url, state_dir)
        print("deployed prefect.yaml")
        prepare_data(root)
        params = {"config": smoke_config(root)}
        result = run_and_wait(server.api_url, args.deployment, params, args.timeout)
        reports = sorted(str(p) for p in (root / "reports").rglob("*.parquet"))
        result = SmokeResult(**{**result.__dict__, "reports": reports})
        print(json.dumps(result.__dict__, indent=2))
        return 0 if result.state == "COMPLETED" and reports else 1
    finally:
        if not args.keep:
            if not had_worker:
                stop_service(worker_name, state_dir)
            if not had_server:
                server.stop()


if __name__ == "__main__":
    sys.exit(main())
