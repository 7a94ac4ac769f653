"""MVTec-layout folders listed and read: ROOT/NAME/{train/good, test/<type>,
ground_truth/<type>/*_mask.png} into ``anomalydino_core.datasets.MVTecCategory`` and arrays."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from anomalydino_core.datasets import MVTecCategory, TestItem
from anomalydino_core.evaluation import DecodedTestSplit
from anomalydino_core.images import ImageDecodeError
from tasks.image_files import read_image, read_mask
from tasks.layout import IMAGE_SUFFIXES


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def load_mvtec_category(root: str | Path, name: str) -> MVTecCategory:
    """List a category; every file under test/ is kept (unreadable ones are reported later)."""
    base = Path(root) / name
    train = base / "train" / "good"
    test = base / "test"
    if not train.is_dir() or not test.is_dir():
        raise FileNotFoundError(
            f"{base} is not an MVTec-layout category (needs train/good and test/)"
        )
    gt_root = base / "ground_truth"
    has_masks = gt_root.is_dir()
    items: list[TestItem] = []
    for type_dir in sorted(p for p in test.iterdir() if p.is_dir()):
        for path in _images(type_dir):
            mask = None
            if has_masks and type_dir.name != "good":
                candidate = gt_root / type_dir.name / f"{path.stem}_mask.png"
                mask = candidate if candidate.is_file() else None
            items.append(TestItem(path=path, defect_type=type_dir.name, mask_path=mask))
    train_images = [p for p in _images(train) if p.suffix.lower() in IMAGE_SUFFIXES]
    return MVTecCategory(name, base, train_images, items, has_masks)


def _read_masks(items: list[TestItem], images: list[np.ndarray]) -> list[np.ndarray]:
    masks = []
    for item, img in zip(items, images, strict=True):
        size = img.shape[:2]
        if item.mask_path is None:
            masks.append(np.zeros(size, dtype=bool))
        else:
            masks.append(read_mask(item.mask_path, size))
    return masks


def read_test_split(category: MVTecCategory, log: Callable[[str], None]) -> DecodedTestSplit:
    """Decode every test image (an unreadable one is logged by name and skipped) and, where the
    category has ground truth, the mask of each readable one."""
    items, images, errors = [], [], []
    for item in category.test:
        try:
            images.append(read_image(item.path))
            items.append(item)
        except ImageDecodeError as exc:
            errors.append(str(exc))
            log(f"WARNING skipping unreadable test image: {exc}")
    masks = _read_masks(items, images) if category.has_masks and items else None
    return DecodedTestSplit(items, images, masks, errors)
