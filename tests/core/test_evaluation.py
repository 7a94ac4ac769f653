"""The evaluation protocol on arrays (no files): shots parsing, rows, references decoded once.

The real MVTec run is tests/tasks/test_evaluation.py; the command line tests/flows/test_evaluate.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from anomalydino_core import datasets  # TestItem by attribute: pytest collects Test* names
from anomalydino_core.config import FoundADSettings, ModelSettings
from anomalydino_core.evaluation import (
    DecodedTestSplit,
    EvaluationRequest,
    evaluate_category,
    parse_methods,
    parse_shots,
)
from anomalydino_core.features import PatchFeatureExtractor


def test_parse_shots():
    assert parse_shots("1,2,4|full") == (1, 2, 4, None)
    assert parse_shots("0") == (0,)
    with pytest.raises(ValueError, match="bad shots"):
        parse_shots("one")


def _disc(rng, defect: bool) -> tuple[np.ndarray, np.ndarray]:
    """A grey disc on black; a defect is a bright square (its mask)."""
    yy, xx = np.mgrid[:128, :128]
    img = np.zeros((128, 128, 3), np.uint8)
    inside = (yy - 64) ** 2 + (xx - 64) ** 2 < 45**2
    img[inside] = 120 + rng.integers(0, 20, (int(inside.sum()), 3), dtype=np.uint8)
    mask = np.zeros((128, 128), bool)
    if defect:
        y, x = rng.integers(40, 76, 2)
        img[y : y + 14, x : x + 14] = (250, 40, 40)
        mask[y : y + 14, x : x + 14] = True
    return img, mask


def _disc_category(per_kind: int, errors: list[str]):
    """(references by path, the category, its decoded test split): 2 good references,
    ``per_kind`` good and ``per_kind`` defective test discs (seeded)."""
    rng = np.random.default_rng(0)
    refs = {Path(f"disc/train/good/{i:03d}.png"): _disc(rng, False)[0] for i in range(2)}
    items, images, masks = [], [], []
    for kind in ("good", "spot"):
        for i in range(per_kind):
            img, mask = _disc(rng, kind != "good")
            path = Path(f"disc/test/{kind}/{i:03d}.png")
            items.append(
                datasets.TestItem(path, kind, None if kind == "good" else path.with_suffix(".m"))
            )
            images.append(img)
            masks.append(mask)
    category = datasets.MVTecCategory("disc", Path("disc"), sorted(refs), items, has_masks=True)
    return refs, category, DecodedTestSplit(items, images, masks, errors=errors)


def test_protocol_runs_on_arrays_and_decodes_each_reference_once(effnet):
    refs, category, test = _disc_category(3, errors=["disc/test/good/x.png: empty file"])
    reads: list[Path] = []

    def read_reference(path: Path) -> np.ndarray:
        reads.append(path)
        return refs[path]

    request = EvaluationRequest(
        data=Path("never/read"),
        category="disc",
        shots=(1, 0),
        seeds=(0, 1),
        model=ModelSettings(backbone="efficientnet_lite0", resolution=128),
    )
    extractor = PatchFeatureExtractor(effnet, resolution=128, precision="fp32", device="cpu")
    df = evaluate_category(request, category, test, extractor, read_reference, lambda _: None)
    assert list(df["shots"]) == ["1", "1", "0"] and list(df["seed"]) == [0, 1, 0]
    assert (df["n_test_images"] == 6).all() and (df["n_unreadable"] == 1).all()
    assert sorted(reads) == sorted(refs)  # each reference decoded once, 8 views embedded
    assert df["image_auroc"].notna().all() and df["pixel_aupro"].notna().all()
    none_readable = DecodedTestSplit([], [], None, ["x"])
    with pytest.raises(ValueError, match="no readable test images"):
        evaluate_category(request, category, none_readable, extractor, read_reference, print)


def test_parse_methods():
    assert parse_methods("knn") == ("knn",)
    assert parse_methods("foundad, knn,foundad") == ("foundad", "knn")
    with pytest.raises(ValueError, match="bad method"):
        parse_methods("patchcore")


def test_knn_and_foundad_side_by_side_on_the_same_pass(effnet):
    """Both methods on one embedding of the test split: one row each per shots x seed, with the
    training cost on FoundAD's; the pixel metrics bin FoundAD's unbounded errors over their own
    range (on kNN's fixed [0, 2] they all fell in the last bin: pixel AUROC exactly 0.5)."""
    refs, category, test = _disc_category(4, errors=[])
    tiny = FoundADSettings(max_epochs=2, max_seconds=None, pool_size=8, val_pool_size=4)
    request = EvaluationRequest(
        data=Path("never/read"),
        category="disc",
        shots=(1,),
        seeds=(0,),
        model=ModelSettings(backbone="efficientnet_lite0", resolution=128),
        methods=("knn", "foundad"),
        foundad=tiny,
    )
    extractor = PatchFeatureExtractor(effnet, resolution=128, precision="fp32", device="cpu")
    measured = []

    def measure(fn):
        measured.append(1)
        return fn(), 1.5

    df = evaluate_category(
        request, category, test, extractor, refs.__getitem__, lambda _: None, measure=measure
    )
    assert list(df["method"]) == ["knn", "foundad"] and measured == [1]
    knn, foundad = df.iloc[0], df.iloc[1]
    assert (knn["shots"], knn["seed"], knn["masking"]) == (
        foundad["shots"],
        foundad["seed"],
        foundad["masking"],
    )
    assert np.isnan(knn["train_seconds"]) and knn["bank_patches"] > 0
    assert foundad["train_seconds"] > 0 and foundad["train_epochs"] == 2
    assert foundad["stopped_by"] == "max_epochs" and foundad["train_peak_rss_gb"] == 1.5
    assert 0.0 <= foundad["pixel_auroc"] <= 1.0 and foundad["pixel_auroc"] != 0.5
    assert df[["image_auroc", "pixel_aupro"]].notna().all().all()
