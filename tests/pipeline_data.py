"""Small real-image lots for the flow tests (copied from the MVTec bottle data into tmp dirs)."""

from __future__ import annotations

from pathlib import Path

REFERENCES = ("000.png", "001.png", "002.png")
LOT_IMAGES = (
    ("good/000.png", "test/good/000.png"),
    ("good/001.png", "test/good/001.png"),
    ("broken_large/000.png", "test/broken_large/000.png"),
    ("contamination/000.png", "test/contamination/000.png"),
)
BAD_FILES = ("unreadable.png", "truncated.png", "zero_bytes.png")
N_READABLE = len(LOT_IMAGES)  # images that get a score, a map
N_DEFECTIVE = sum(1 for rel, _ in LOT_IMAGES if not rel.startswith("good/"))  # flagged
N_LOT = len(LOT_IMAGES) + len(BAD_FILES)  # report rows


def bad_file_bytes(mvtec_root: Path) -> dict[str, bytes]:
    """An unreadable image (not an image at all), a truncated PNG and a zero-byte file."""
    png = (mvtec_root / "bottle" / "test" / "good" / "002.png").read_bytes()
    return {
        "unreadable.png": b"this is a text file that claims to be a PNG\n",
        "truncated.png": png[: len(png) // 3],
        "zero_bytes.png": b"",
    }


def lot_files(mvtec_root: Path, bad: bool = True) -> dict[str, bytes]:
    """relative path -> bytes of a small lot: 2 good, 2 defective (+ the 3 bad files)."""
    src = mvtec_root / "bottle"
    files = {rel: (src / path).read_bytes() for rel, path in LOT_IMAGES}
    if bad:
        files.update(bad_file_bytes(mvtec_root))
    return files


def reference_files(mvtec_root: Path, names=REFERENCES) -> dict[str, bytes]:
    src = mvtec_root / "bottle" / "train" / "good"
    return {name: (src / name).read_bytes() for name in names}


def write_local(base: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def fast_config(root: str, **runtime) -> dict:
    """Config overrides for fast tests: efficientnet_lite0 at 224, small chunks."""
    return {
        "root": root,
        "model": {"backbone": "efficientnet_lite0", "resolution": 224, "threads": 2},
        "runtime": {"chunk_size": 3, **runtime},
        "products": {"bottle": {"rotation": "informed"}},
    }
