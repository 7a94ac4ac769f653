"""Shared fixtures: where the real MVTec data lives, and a quiet, reproducible torch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

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
