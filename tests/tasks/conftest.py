"""Fixtures of the I/O-layer tests: a machine cache of their own."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory) -> Iterator[Path]:
    """A fresh ``$ANOMALYDINO_CACHE`` (exports, calibrations) for one test module."""
    root = tmp_path_factory.mktemp("anomalydino-cache")
    saved = os.environ.get("ANOMALYDINO_CACHE")
    os.environ["ANOMALYDINO_CACHE"] = str(root)
    yield root
    if saved is None:
        os.environ.pop("ANOMALYDINO_CACHE", None)
    else:
        os.environ["ANOMALYDINO_CACHE"] = saved
