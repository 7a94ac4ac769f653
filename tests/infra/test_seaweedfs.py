"""infra.seaweedfs against a real ``weed mini`` on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infra.processes import ServiceError, record_path
from infra.seaweedfs import SEAWEEDFS, start_seaweedfs
from infra.stack import status
from tests.infra.process_checks import gone, listen_addrs


def test_seaweedfs_start_is_idempotent_and_stop_kills(tmp_path: Path) -> None:
    s3 = start_seaweedfs(tmp_path)
    try:
        assert s3.endpoint_url.startswith("http://127.0.0.1:")
        assert s3.secret_key not in repr(s3)
        assert listen_addrs(s3.pid) == {"127.0.0.1"}
        again = start_seaweedfs(tmp_path)
        assert (again.pid, again.endpoint_url, again.secret_key) == (
            s3.pid,
            s3.endpoint_url,
            s3.secret_key,
        )
        record = json.loads(record_path(SEAWEEDFS, tmp_path).read_text())
        assert record["pid"] == s3.pid and s3.secret_key not in json.dumps(record)
        st = status(tmp_path)[SEAWEEDFS]
        assert st.running and st.healthy and st.pid == s3.pid
        assert (tmp_path / "secrets" / "s3_secret_key").stat().st_mode & 0o077 == 0
        with pytest.raises(ServiceError, match="already running"):
            start_seaweedfs(tmp_path, port=1)
    finally:
        assert s3.stop()
    assert gone(s3.pid)
    assert not record_path(SEAWEEDFS, tmp_path).exists()
    assert not s3.stop()  # nothing left to stop
    assert status(tmp_path) == {}
