"""An MVTec-layout category as data: its train/good references, test items and mask names.

The layout is ROOT/NAME/{train/good, test/<type>, ground_truth/<type>/*_mask.png}. The paths here
are names only: listing a folder into an ``MVTecCategory`` and reading its files is
``tasks/datasets.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
