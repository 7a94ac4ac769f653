"""Shared fixtures: where the real MVTec data lives, a quiet, reproducible torch, a real SeaweedFS
on loopback and a temporary Prefect server (both started once per session, when a test asks)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from infra.seaweedfs import S3Service, start_seaweedfs
from tasks.storage import StorageConfig, filesystem

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
MVTEC_ROOT = Path(
    os.environ.get("ANOMALYDINO_MVTEC_ROOT", REPO.parent / "shared" / "data" / "mvtec_ad")
)

CATEGORIES_ROOT = Path(
    os.environ.get(
        "ANOMALYDINO_CATEGORIES_ROOT", REPO.parent / "shared" / "data" / "mvtec_categories"
    )
)

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def mvtec_root() -> Path:
    """The real MVTec AD data (read-only, never copied). Tests skip only when it is absent."""
    if not (MVTEC_ROOT / "bottle" / "train" / "good").is_dir():
        pytest.skip(f"MVTec data not found at {MVTEC_ROOT} (set ANOMALYDINO_MVTEC_ROOT)")
    return MVTEC_ROOT


@pytest.fixture(scope="session")
def categories_root() -> Path:
    """One good image per MVTec AD category (read-only). Tests skip only when it is absent."""
    if not (CATEGORIES_ROOT / "bottle" / "good_000.png").is_file():
        pytest.skip(f"MVTec categories not found at {CATEGORIES_ROOT}")
    return CATEGORIES_ROOT


@pytest.fixture(scope="session")
def effnet():
    from tasks.weights import load_backbone

    return load_backbone("efficientnet_lite0")


@dataclass(frozen=True)
class S3Env:
    """A running SeaweedFS and the ``StorageConfig`` to reach it."""

    service: S3Service
    storage: StorageConfig

    def new_bucket(self, prefix: str = "test") -> str:
        """Create a fresh, empty bucket and return its ``s3://`` URI."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        fs, _ = filesystem(f"s3://{name}", self.storage)
        fs.mkdir(name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Env]:
    service = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs-state"))
    storage = StorageConfig(
        endpoint_url=service.endpoint_url, key=service.access_key, secret=service.secret_key
    )
    try:
        yield S3Env(service=service, storage=storage)
    finally:
        service.stop()


@pytest.fixture
def bucket(s3: S3Env) -> str:
    """A fresh bucket URI for one test."""
    return s3.new_bucket()


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[str]:
    """A temporary Prefect server and database for the session; yields its API URL."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield str(PREFECT_API_URL.value())
