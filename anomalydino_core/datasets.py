"""MVTec-layout folders: ROOT/NAME/{train/good, test/<type>, ground_truth/<type>/*_mask.png}."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

#: Table 8 of the paper: (masking, rotate) per category for the 'informed' preprocessing.
#: Masking 'auto' means the masking test decides; textures are never masked.
INFORMED_SETTINGS: dict[str, tuple[str, bool]] = {
    **{c: ("off", False) for c in ("carpet", "grid", "leather", "tile", "wood")},
    **{c: ("auto", False) for c in ("bottle", "cable", "capsule", "metal_nut", "pill")},
    **{c: ("auto", False) for c in ("toothbrush", "transistor", "zipper")},
    "hazelnut": ("auto", True),
    "screw": ("auto", True),
    **{
        c: ("on", False)
        for c in (
            "candle",
            "capsules",
            "cashew",
            "chewinggum",
            "fryum",
            "macaroni1",
            "macaroni2",
            "pcb1",
            "pcb2",
            "pcb3",
            "pcb4",
            "pipe_fryum",
        )
    },
}


@dataclass(frozen=True)
class TestItem:
    path: Path
    defect_type: str  # "good" for nominal images
    mask_path: Path | None

    @property
    def label(self) -> int:
        return 0 if self.defect_type == "good" else 1

    @property
    def image_id(self) -> str:
        return f"{self.defect_type}/{self.path.name}"


@dataclass(frozen=True)
class MVTecCategory:
    name: str
    root: Path
    train_good: list[Path]
    test: list[TestItem]
    has_masks: bool

    def references(self, shots: int | None, seed: int) -> list[Path]:
        """``sorted(train/good)[seed*k:(seed+1)*k]``; all of them for full-shot (``None``)."""
        if shots is None:
            return list(self.train_good)
        start, stop = seed * shots, (seed + 1) * shots
        if stop > len(self.train_good):
            raise ValueError(
                f"{self.name}: {shots}-shot seed {seed} needs train images {start}..{stop - 1}, "
                f"only {len(self.train_good)} exist"
            )
        return self.train_good[start:stop]


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
