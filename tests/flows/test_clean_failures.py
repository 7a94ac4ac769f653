"""Commands fail fast and cleanly: bad names and configs are refused in well under 2 s with one
``error:`` line and exit code 2, before any Prefect server starts; a completed run with error
rows exits 3; a CLI killed with ``kill -9`` leaves no temporary Prefect server behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from flows.cli import main
from tests.pipeline_data import reference_files, write_local

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def prefect_console():
    """Prefect's console handler set up before capsys swaps sys.stderr (else it would keep
    writing to a capture stream closed after the test)."""
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
    env.update(
        HF_HUB_OFFLINE="1",
        DO_NOT_TRACK="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        ANOMALYDINO_CONFIG="",
        ANOMALYDINO_LOG_DIR=str(tmp_path / "logs"),
    )
    env.update(extra)
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", *args]


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("audit", "--product", "bottle", "--lot", "../etc"), "lot name '../etc'"),
        (("audit", "--product", "bot tle", "--lot", "l1"), "product name 'bot tle'"),
        (("audit", "--product", "bottle", "--lot", "l1", "--version", "v1/x"), "version name"),
        (("screen", "--product", "bottle", "--shipment", "s;rm"), "shipment name 's;rm'"),
        (("nightly", "--product", "ok", "--product", "$HOME"), "product name '$HOME'"),
        (("build-bank", "--product", "bottle", "--version", ".."), "version name '..'"),
        (("audit", "--product", "p", "--lot", "l", "--resolution", "-3"), "model.resolution"),
        (("audit", "--product", "p", "--lot", "l", "--root", "s3://K:S@b/r"), "root (a URI"),
        (("audit", "--product", "p", "--lot", "l", "--config", "/no/such.yaml"), "such.yaml"),
    ],
)
def test_bad_names_and_configs_fail_fast_with_one_line(tmp_path, args, named) -> None:
    t0 = time.monotonic()
    proc = subprocess.run(
        _cli(*args), cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=60
    )
    seconds = time.monotonic() - t0
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], lines
    assert seconds < 2.0, f"refused after {seconds:.1f}s"
    assert not (tmp_path / "prefect-home").exists()  # no Prefect server was started


def _lot(tmp_path: Path, mvtec_root: Path, bad: bool = False) -> Path:
    root = tmp_path / "pipeline"
    write_local(root / "references" / "bottle" / "v1", reference_files(mvtec_root))
    good = mvtec_root / "bottle" / "test" / "good"
    files = {f"{i:03d}.png": (good / f"{i:03d}.png").read_bytes() for i in range(2)}
    if bad:
        files["junk.png"] = b"not an image"
    write_local(root / "incoming" / "bottle" / "lot-1", files)
    return root


def _audit_args(root: Path) -> list[str]:
    return ["audit", "--product", "bottle", "--lot", "lot-1", "--root", str(root)] + [
        "--backbone", "efficientnet_lite0", "--resolution", "224", "--threads", "2",
    ]  # fmt: skip


@pytest.mark.slow
def test_a_completed_run_with_error_rows_exits_3(prefect_harness, tmp_path, mvtec_root, capsys):
    root = _lot(tmp_path, mvtec_root, bad=True)
    assert main(_audit_args(root)) == 3
    out = capsys.readouterr()
    assert "images 3, flagged" in out.out and "errors 1" in out.out
    assert "error:" not in out.err


def _servers(pid: int) -> list[psutil.Process]:
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [c for c in children if "uvicorn" in " ".join(_cmdline(c))]


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return []


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def test_kill_9_of_the_cli_leaves_no_prefect_server(tmp_path, mvtec_root) -> None:
    root = _lot(tmp_path, mvtec_root)
    cli = subprocess.Popen(
        _cli(*_audit_args(root)),
        cwd=REPO,
        env=_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    servers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 180
        while not servers and cli.poll() is None and time.monotonic() < deadline:
            servers = _servers(cli.pid)
            time.sleep(0.1)
        assert servers, "the CLI never started its temporary Prefect server"
        os.kill(cli.pid, signal.SIGKILL)  # the CLI only, as the OOM killer would
        cli.wait(30)
        deadline = time.monotonic() + 10
        while any(_alive(s) for s in servers) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [s.pid for s in servers if _alive(s)]
        assert not left, f"temporary Prefect server(s) {left} outlived the killed CLI"
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait(30)
        for server in servers:
            if _alive(server):
                server.kill()
