"""The evaluation's I/O side on the real MVTec bottle images (1-shot, one seed)."""

from __future__ import annotations

import pytest

from anomalydino_core.config import ModelSettings
from anomalydino_core.evaluation import EvaluationRequest
from tasks.evaluation import run_evaluation

pytestmark = pytest.mark.slow


def test_one_shot_bottle_meets_the_bars(mvtec_root):
    request = EvaluationRequest(
        data=mvtec_root,
        category="bottle",
        shots=(1,),
        seeds=(0,),
        model=ModelSettings(backbone="efficientnet_lite0"),
    )
    df = run_evaluation(request, log=lambda _: None)
    row = df.iloc[0]
    assert row["n_test_images"] == 83 and row["bank_patches"] == 8 * 28 * 28
    assert row["image_auroc"] >= 0.998, row["image_auroc"]
    assert row["pixel_aupro"] >= 0.960, row["pixel_aupro"]
    assert row["backbone"] == "efficientnet_lite0" and len(row["weights_sha256"]) == 64


def test_peak_rss_during_sees_a_temporary_allocation():
    """In a fresh process: this one's allocator may hand a big block back from memory it
    already holds, so its resident size would not move."""
    import subprocess
    import sys

    code = (
        "import time, numpy as np\n"
        "from tasks.evaluation import peak_rss_during\n"
        "def allocate():\n"
        "    block = np.ones(400 * 2**20 // 8); time.sleep(0.2); return int(block.size)\n"
        "_, before = peak_rss_during(lambda: 0)\n"
        "size, peak = peak_rss_during(allocate)\n"
        "print(size, before, peak)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    size, before, peak = int(out[0]), float(out[1]), float(out[2])
    assert size == 400 * 2**20 // 8
    assert peak - before > 0.3, (before, peak)  # GiB
