"""Decoding images of any mode into RGB uint8 (grayscale, RGBA, 16-bit, palette), behind a
size guard that reads only the header.

Hostile or broken inputs never escape as anything but ``ImageDecodeError`` (naming the item and
the reason): empty, truncated, corrupt and non-image files, and images whose header claims more
pixels than ``max_pixels`` (decompression bombs: a 1 MB PNG of zeros can claim 20000 x 20000),
fewer than one backbone patch in either dimension, or a more extreme aspect ratio than the
pipeline embeds. The size is checked before any pixel buffer exists: PNG from its IHDR, JPEG
from its SOF marker, other formats from PIL's lazily opened header.
"""

from __future__ import annotations

import io
import re

import cv2
import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

# A truncated file must fail loudly, never decode as a partly grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False

DECODE_MAX_PIXELS = 64 * 2**20
"""Default of ``ModelSettings.decode_max_pixels``: 67,108,864 pixels (8192 x 8192).

Sized for a 24 GB machine at the default parallelism. Measured on the pipeline (an audit of one
8192 x 8192 JPEG with efficientnet_lite0, flagged so its overlay is rendered): the peak RSS grew
by 2.0 GB over a small image's, 31 bytes per pixel. The decode itself peaks at 4-6 B/px for
8-bit PNGs, 10 for JPEGs, 14 for 16-bit PNGs, and keeps the RGB copy (3 B/px); the rest is the
float32 anomaly map at the original size with its smoothing buffers, its float16 copy and
compressed chunk, and the overlay. A ``score-images`` task works on ``runtime.io_threads`` (4)
images at once and keeps the decoded RGB of its whole chunk (``runtime.chunk_size``, 16) for the
overlays, so with every image at the limit: ``67.1 M x (4 x 28 + 16 x 3) B = 10.7 GB`` over a
~1.4 GB process (model, bank): about half of 24 GB. It is below PIL's own bomb warning
(89.5 M pixels) and above common industrial cameras (up to ~65 MP). Raise it only with memory to
match; ``io_threads``, ``chunk_size`` and ``concurrency`` scale the same sum.
"""

MAX_ASPECT_RATIO = 16
"""Longer edge / shorter edge beyond which an image is refused: the shorter edge is resized to
the resolution, so a 20 x 60000 strip would become a 448 x 1344000 model input (7 GB as float32;
a ViT's attention grows with the square of its length). 16:1 covers line-scan strips."""


class ImageDecodeError(ValueError):
    """An input could not be decoded as an image; the message names the item and the reason."""


class ImageSizeError(ImageDecodeError):
    """The image's header gives a size the pipeline refuses (too many pixels, too small, or too
    elongated); raised before any pixel is decoded."""


def _giga(n: float) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g} {unit}"
    return f"{n:g}"


def check_image_size(
    height: int,
    width: int,
    name: str,
    *,
    max_pixels: int | None = DECODE_MAX_PIXELS,
    min_edge: int = 1,
) -> None:
    """Raise ``ImageSizeError`` for an image of (height, width) the pipeline must not decode:
    more than ``max_pixels`` pixels (``None``: no limit), an edge shorter than ``min_edge``
    (the backbone's patch size: no patch would cover it), or an aspect ratio above
    ``MAX_ASPECT_RATIO``."""
    h, w = int(height), int(width)
    if max_pixels is not None and h * w > max_pixels:
        raise ImageSizeError(
            f"{name}: {w} x {h} = {_giga(h * w)} pixels exceeds the limit of {max_pixels:,} "
            f"pixels (decode_max_pixels)"
        )
    if min(h, w) < max(1, min_edge):
        what = f"one {min_edge} px patch of the backbone" if min_edge > 1 else "one pixel"
        raise ImageSizeError(f"{name}: {w} x {h} pixels is smaller than {what}")
    if max(h, w) > MAX_ASPECT_RATIO * min(h, w):
        raise ImageSizeError(
            f"{name}: {w} x {h} pixels has an aspect ratio of {max(h, w) / min(h, w):.0f}:1; "
            f"at most {MAX_ASPECT_RATIO}:1 can be embedded"
        )


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOF = frozenset(
    (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)
)


def _png_ihdr(data: bytes) -> tuple[int, int, int, int] | None:
    """(height, width, bit depth, colour type) from a PNG's IHDR (the first chunk), or None."""
    if len(data) < 33 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return height, width, data[24], data[25]


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's first SOF marker (segments before it are skipped by their
    lengths; nothing is decoded), or None when the markers end or break before one."""
    if not data.startswith(b"\xff\xd8"):
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # segments without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if length < 2:
            return None
        if marker in _JPEG_SOF:
            if length < 7 or i + 9 > n:
                return None
            return int.from_bytes(data[i + 5 : i + 7], "big"), int.from_bytes(
                data[i + 7 : i + 9], "big"
            )
        i += 2 + length
    return None


def header_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) read from a PNG or JPEG header without decoding; None for other formats
    (or an unreadable header: the decoder then explains)."""
    ihdr = _png_ihdr(data)
    if ihdr is not None:
        return ihdr[0], ihdr[1]
    return _jpeg_size(data)


def _to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L"):
        # round(x / 65535 * 255) == round(x / 257) == (x + 128) // 257 (never a tie), in
        # integers: 2 + 4 bytes per pixel instead of several float64 copies
        arr = np.asarray(img).astype(np.uint32)
        gray = ((arr + 128) // 257).astype(np.uint8)
        return cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)
    if mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if arr.max() > 255 else 255.0
        if mode == "F":
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        else:
            arr = arr / hi
        gray = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
        return cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        # Composite on black (what a camera-facing inspection background usually is is unknown;
        # black keeps the object pixels exactly as they are).
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    if mode == "RGB":
        return np.asarray(img)  # no intermediate converted copy
    if mode == "L":
        return cv2.cvtColor(np.asarray(img), cv2.COLOR_GRAY2RGB)
    return np.asarray(img.convert("RGB"))


def _decode_plain_png(data: bytes) -> np.ndarray | None:
    """Opaque grey, RGB and palette PNGs of up to 8 bits through OpenCV's libpng (~40% faster
    than PIL; peak 4 bytes per pixel for grey, 6 for RGB, against PIL's 10); None for anything
    else (alpha, transparency, 16-bit: decided from the IHDR before decoding) or any decoding
    error, which PIL then handles and explains. libpng fails on truncated data and bad CRCs, so
    this never returns partial images."""
    ihdr = _png_ihdr(data)
    if ihdr is None or ihdr[2] > 8 or ihdr[3] not in (0, 2, 3) or b"tRNS" in data[:65536]:
        return None
    buf = np.frombuffer(data, dtype=np.uint8)
    try:  # straight to RGB (grey and palette expanded): no BGR pass, 0.5 of 13 ms at 900x900
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR_RGB)
    except Exception:  # cv2.error (e.g. over CV_IO_MAX_IMAGE_PIXELS): PIL explains
        return None
    if img is None or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        return None
    return img


_PIL_BOMB = re.compile(r"\((\d+) pixels\)")


def _allow_pil_pixels(max_pixels: int | None) -> None:
    """PIL's own decompression-bomb guard (a warning over 89.5 M pixels, an error over twice
    that) must not refuse what ``max_pixels`` allows: our header check has run already."""
    current = Image.MAX_IMAGE_PIXELS
    if current is not None and (max_pixels is None or max_pixels > current):
        Image.MAX_IMAGE_PIXELS = None if max_pixels is None else int(max_pixels)


def decode_image(
    data: bytes,
    name: str = "<bytes>",
    *,
    max_pixels: int | None = DECODE_MAX_PIXELS,
    min_edge: int = 1,
) -> np.ndarray:
    """Decode encoded image bytes to an (H, W, 3) uint8 RGB array, or raise ImageDecodeError.

    The size is checked from the header first (``check_image_size``); no pixel buffer is
    allocated for a refused image. Any failure of the decoders becomes ``ImageDecodeError``.
    """
    if not data:
        raise ImageDecodeError(f"{name}: empty file (0 bytes)")
    size = header_size(data)
    if size is not None:
        check_image_size(*size, name, max_pixels=max_pixels, min_edge=min_edge)
        fast = _decode_plain_png(data)
        if fast is not None:
            return fast
    _allow_pil_pixels(max_pixels)
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size  # header only: nothing decoded yet
            check_image_size(height, width, name, max_pixels=max_pixels, min_edge=min_edge)
            img.load()
            rgb = _to_rgb(img)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(f"{name}: not a recognised image format") from None
    except Image.DecompressionBombError as exc:
        found = _PIL_BOMB.search(str(exc))
        claimed = f"{_giga(int(found.group(1)))} pixels" if found else "too many pixels"
        limit = "PIL's" if max_pixels is None else f"{max_pixels:,} pixels"
        raise ImageSizeError(
            f"{name}: {claimed} exceeds the limit of {limit} (decode_max_pixels)"
        ) from None
    except Exception as exc:  # OSError, SyntaxError, ValueError, struct.error, MemoryError...
        reason = str(exc) or type(exc).__name__
        raise ImageDecodeError(f"{name}: cannot decode image ({reason})") from None
    if rgb.ndim != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ImageDecodeError(f"{name}: decoded to an empty image {rgb.shape}")
    return np.ascontiguousarray(rgb)
