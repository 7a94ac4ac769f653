"""Small JPEG thumbnails of flagged images and of their overlays, written by the scoring tasks
while the image and its map are in memory (``<run maps>/thumbs/<image key>.jpg`` and
``thumbs/overlays/``, the overlay on the run's colour scale): the lot page (``tasks.lot_report``)
copies them instead of decoding every full-size source and overlay PNG again."""

from __future__ import annotations

import cv2
import numpy as np

from anomalydino_core.overlays import render_overlay
from tasks.embedding_store import image_key
from tasks.storage import StorageConfig, atomic_write_bytes, join

THUMB_EDGE = 360  # longest edge of the written thumbnails, in pixels
JPEG_QUALITY = 85


def thumb_uri(thumbs_uri: str, image_id: str) -> str:
    """Where the thumbnail of ``image_id`` is, under a run's ``thumbs`` folder."""
    return join(thumbs_uri, f"{image_key(image_id)}.jpg")


def overlay_thumb_uri(thumbs_uri: str, image_id: str) -> str:
    """Where the overlay thumbnail of ``image_id`` is (the image blended with its map on the
    run's colour scale, rendered by the scoring task next to the full-size overlay)."""
    return join(thumbs_uri, "overlays", f"{image_key(image_id)}.jpg")


def fit(rgb: np.ndarray, edge: int) -> np.ndarray:
    """``rgb`` scaled down (never up) so that its longest edge is at most ``edge``."""
    h, w = rgb.shape[:2]
    scale = min(1.0, edge / max(h, w))
    if scale >= 1.0:
        return rgb
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def fit_map(amap: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """An anomaly map resized to ``(h, w)``, float32. The maps are smooth (patch distances
    upsampled and blurred), so every ``step``-th pixel is taken first, then area-averaged."""
    h, w = shape
    step = max(1, min(amap.shape[0] // h, amap.shape[1] // w))
    src = np.asarray(amap[::step, ::step], dtype=np.float32)
    if src.shape == (h, w):
        return src
    return cv2.resize(src, (w, h), interpolation=cv2.INTER_AREA)


def jpeg(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
    )
    if not ok:
        raise OSError("JPEG encoding failed")
    return buf.tobytes()


def decode_jpeg(data: bytes) -> np.ndarray:
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("not a decodable thumbnail")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def write_thumbnail(
    thumbs_uri: str,
    image_id: str,
    rgb: np.ndarray,
    storage: StorageConfig | None,
    overlay: tuple[np.ndarray, tuple[float, float]] | None = None,
) -> str:
    """Write the thumbnail of a decoded image and, given ``(anomaly map, colour scale)``, the
    thumbnail of its overlay; returns the image thumbnail's URI."""
    small = fit(rgb, THUMB_EDGE)
    uri = thumb_uri(thumbs_uri, image_id)
    atomic_write_bytes(uri, jpeg(small), storage)
    if overlay is not None:
        amap, (vmin, vmax) = overlay
        blended = render_overlay(small, fit_map(amap, small.shape[:2]), vmin, vmax)
        atomic_write_bytes(overlay_thumb_uri(thumbs_uri, image_id), jpeg(blended), storage)
    return uri
