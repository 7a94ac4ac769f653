"""A disk that fills up mid-run (a real tmpfs, mounted here as root): the run fails at once
(ENOSPC is permanent, never retried), exit code 1 with one ``error:`` line, its partial map
folder is removed, and the embedding store holds no entry without its group metadata (zarr
opens and lists it without a warning)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
import warnings
from pathlib import Path

import pytest
import zarr

from flows.cli import main
from tests.pipeline_data import reference_files, write_local

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def prefect_console():
    """Prefect's console handler set up before capsys swaps sys.stderr (else it would keep
    writing to a capture stream closed after the test)."""
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 24 MiB tmpfs (skipped where it cannot be mounted: not root, no tmpfs)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder: Path, leave: int) -> None:
    """Fill the file system of ``folder`` up to ``leave`` free bytes."""
    stat = os.statvfs(folder)
    free = stat.f_bavail * stat.f_frsize
    with open(folder / "ballast.bin", "wb") as fh:
        fh.write(b"\0" * max(0, free - leave))


def test_disk_full_fails_at_once_and_leaves_nothing_half_written(
    prefect_harness, tmp_path, small_disk, mvtec_root, capsys, caplog, monkeypatch
) -> None:
    monkeypatch.setenv("ANOMALYDINO_LOG_DIR", str(tmp_path / "logs"))
    data = tmp_path / "data"
    write_local(data / "references" / "bottle" / "v1", reference_files(mvtec_root))
    good = mvtec_root / "bottle" / "test" / "good"
    for lot, n in (("lot-a", 1), ("lot-b", 3)):
        files = {f"{i:03d}.png": (good / f"{i:03d}.png").read_bytes() for i in range(n)}
        write_local(data / "incoming" / "bottle" / lot, files)
    root = small_disk / "pipeline"
    args = ["--product", "bottle", "--root", str(root), "--incoming", str(data / "incoming")]
    args += ["--references", str(data / "references"), "--backbone", "efficientnet_lite0"]
    args += ["--resolution", "224", "--threads", "2", "--chunk-size", "1"]
    assert main(["audit", "--lot", "lot-a", *args]) == 0  # bank and store on the small disk
    capsys.readouterr()

    before = len(list(root.glob("embeddings/bottle/*.zarr/images/*/")))
    assert before == 3 * 8 + 1  # the references in 8 rotations, lot-a's image
    _fill(small_disk, leave=40_000)  # room for metadata, not for a 60 kB feature chunk
    caplog.set_level(logging.INFO)
    t0 = time.monotonic()
    rc = main(["audit", "--lot", "lot-b", *args])
    seconds = time.monotonic() - t0
    err = capsys.readouterr().err.strip().splitlines()

    assert rc == 1
    assert err[-1].startswith("error: ") and "No space left on device" in err[-1]
    assert str(root / "embeddings") in err[-1]  # names the URI it could not write
    assert seconds < 20, f"failed after {seconds:.0f}s"
    assert not [r for r in caplog.records if "Retry " in r.getMessage()]  # never retried
    # the failed run's map folder is gone; lot-a's (reported) is kept
    assert not (root / "maps" / "bottle" / "lot-b").exists() or not any(
        (root / "maps" / "bottle" / "lot-b").iterdir()
    )
    assert len(list((root / "maps" / "bottle" / "lot-a").iterdir())) == 1
    # every embedding entry has its group metadata: zarr lists the store without a warning
    (store,) = (root / "embeddings" / "bottle").glob("*.zarr")
    entries = [e for e in (store / "images").iterdir() if e.is_dir()]
    assert len(entries) >= before  # a lot-b image may have been stored before its map failed
    groups = [json.loads((entry / "zarr.json").read_text()) for entry in entries]
    assert all(g["attributes"]["complete"] is True for g in groups)  # nothing half-written
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(zarr.open_group(str(store), mode="r").members(max_depth=None))

    (small_disk / "ballast.bin").unlink()  # space again: the same lot now goes through
    assert main(["audit", "--lot", "lot-b", *args]) == 0
