"""The CUDA path (run where a GPU is present; CI has none, so these skip there)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from anomalydino_core.config import ModelSettings, ScoringSettings
from anomalydino_core.evaluation import EvaluationRequest
from anomalydino_core.features import PatchFeatureExtractor, select_device
from anomalydino_core.memory_bank import PatchIndex
from anomalydino_core.zero_shot import MutualScoringConfig, score_mutual
from tasks.evaluation import run_evaluation
from tasks.weights import load_backbone

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _photos() -> list[np.ndarray]:
    skimage_data = pytest.importorskip("skimage.data")
    return [skimage_data.chelsea(), skimage_data.coffee(), skimage_data.astronaut()]


def _cos_min(a: np.ndarray, b: np.ndarray) -> float:
    ta, tb = torch.from_numpy(a).flatten(0, -2), torch.from_numpy(b).flatten(0, -2)
    return float(torch.nn.functional.cosine_similarity(ta, tb, dim=1).min())


def test_auto_device_is_cuda_and_auto_precision_follows_the_backbone():
    assert select_device("auto").type == "cuda"
    vit = PatchFeatureExtractor(load_backbone("dinov2_vits14", weights="random"), resolution=448)
    assert vit.device.type == "cuda" and vit.precision == "bf16"
    # efficientnet_lite0 stays fp32 (auto_bf16=False): bf16 was slower on the H100 too
    effnet = PatchFeatureExtractor(load_backbone("efficientnet_lite0"), resolution=448)
    assert effnet.device.type == "cuda" and effnet.precision == "fp32"


@pytest.mark.parametrize("name", ["efficientnet_lite0", "dinov2_vits14"])
def test_cuda_features_match_cpu_fp32(name):
    torch.manual_seed(0)
    backbone = load_backbone(name, weights="random" if name.startswith("dinov2") else None)
    images = _photos()
    cpu = PatchFeatureExtractor(backbone, resolution=448, precision="fp32", device="cpu")
    ref = [g.copy() for g in cpu.embed(images)]
    for precision, bar in (("fp32", 0.9999), ("bf16", 0.999)):
        gpu = PatchFeatureExtractor(backbone, resolution=448, precision=precision, device="cuda")
        got = gpu.embed(images)
        for g, r in zip(got, ref, strict=True):
            assert g.shape == r.shape
            assert _cos_min(g, r) >= bar, (name, precision)


def test_exact_index_searches_on_cuda_in_fp32():
    rng = np.random.default_rng(3)
    bank = rng.normal(size=(70000, 152)).astype(np.float32)  # two CUDA blocks, padded dims
    queries = rng.normal(size=(700, 152)).astype(np.float32)
    cpu = PatchIndex(use_gpu=False).fit(bank)
    gpu = PatchIndex().fit(bank)
    assert not cpu.use_gpu and gpu.use_gpu
    a, b = cpu.search(queries), gpu.search(queries)
    assert np.abs(a.distances - b.distances).max() < 1e-5
    assert np.mean(a.indices == b.indices) > 0.999
    again = PatchIndex.from_bytes(gpu.to_bytes(), "exact")
    assert again.use_gpu and np.array_equal(again.search(queries).indices, b.indices)


def test_exact_bf16_index_runs_on_cuda_and_matches_exact():
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(20000, 384)).astype(np.float32)
    queries = bank[:500] + rng.normal(0, 0.05, (500, 384)).astype(np.float32)
    exact = PatchIndex().fit(bank).search(queries)
    fast = PatchIndex("exact_bf16").fit(bank)
    assert fast._bank16.device.type == "cuda"
    got = fast.search(queries)
    assert np.abs(got.distances - exact.distances).max() < 2e-3
    assert np.mean(got.indices == exact.indices) > 0.99


def test_zero_shot_on_cuda_matches_cpu():
    rng = np.random.default_rng(1)
    grids = [rng.normal(size=(16, 16, 64)).astype(np.float32) for _ in range(6)]
    grids[2][5, 5] += 4.0
    sizes = [(64, 64)] * 6
    cpu = score_mutual(grids, image_sizes=sizes, config=MutualScoringConfig(device="cpu"))
    gpu = score_mutual(grids, image_sizes=sizes, config=MutualScoringConfig(device="cuda"))
    for a, b in zip(cpu, gpu, strict=True):
        assert abs(a.score - b.score) < 1e-4 * max(1.0, abs(a.score))
        assert np.allclose(a.anomaly_map, b.anomaly_map, atol=1e-4)
    assert max(range(6), key=lambda i: cpu[i].score) == 2


def _synthetic_category(root, rng):
    """A small MVTec-layout category: a grey disc on black, defects are bright squares."""

    def disc(defect: bool) -> tuple[np.ndarray, np.ndarray]:
        yy, xx = np.mgrid[:224, :224]
        img = np.zeros((224, 224, 3), np.uint8)
        inside = (yy - 112) ** 2 + (xx - 112) ** 2 < 80**2
        img[inside] = 120 + rng.integers(0, 20, (int(inside.sum()), 3), dtype=np.uint8)
        mask = np.zeros((224, 224), np.uint8)
        if defect:
            y, x = rng.integers(70, 140, 2)
            img[y : y + 24, x : x + 24] = (250, 40, 40)
            mask[y : y + 24, x : x + 24] = 255
        return img, mask

    for split, kind, n in (("train", "good", 4), ("test", "good", 4), ("test", "spot", 4)):
        (root / "disc" / split / kind).mkdir(parents=True, exist_ok=True)
        if kind != "good":
            (root / "disc" / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, mask = disc(kind != "good")
            Image.fromarray(img).save(root / "disc" / split / kind / f"{i:03d}.png")
            if kind != "good":
                Image.fromarray(mask).save(
                    root / "disc" / "ground_truth" / kind / f"{i:03d}_mask.png"
                )


def test_evaluation_runs_on_cuda(tmp_path):
    _synthetic_category(tmp_path, np.random.default_rng(2))
    request = EvaluationRequest(
        data=tmp_path,
        category="disc",
        shots=(1, 0),
        seeds=(0,),
        model=ModelSettings(backbone="efficientnet_lite0", resolution=224),
        scoring=ScoringSettings(index="exact_bf16"),
    )
    df = run_evaluation(request, log=lambda _: None)
    assert len(df) == 2 and (df["image_auroc"] >= 0.99).all()
