"""Hostile image bytes built in memory: headers that claim huge sizes over tiny payloads."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_with_header(
    width: int, height: int, *, bit_depth: int = 8, colour: int = 2, idat: bytes | None = None
) -> bytes:
    """A PNG whose valid IHDR claims ``width`` x ``height`` over a tiny IDAT (a few zero rows,
    compressed): a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    if idat is None:
        idat = zlib.compress(b"\x00" * 4096)
    return (
        PNG_SIGNATURE
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def jpeg_bytes(width: int = 16, height: int = 16, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(0)
    shape = (height, width) if mode == "L" else (height, width, len(mode))
    img = Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def jpeg_with_header(width: int, height: int) -> bytes:
    """A small real JPEG whose SOF marker is patched to claim ``width`` x ``height``."""
    data = bytearray(jpeg_bytes())
    i = 2
    while True:
        marker, length = data[i + 1], int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            data[i + 5 : i + 7] = height.to_bytes(2, "big")
            data[i + 7 : i + 9] = width.to_bytes(2, "big")
            return bytes(data)
        i += 2 + length


def zeros_png(height: int, width: int) -> bytes:
    """A grey PNG of zeros (20000 x 20000 compresses to ~1 MB)."""
    import cv2

    ok, buf = cv2.imencode(".png", np.zeros((height, width), np.uint8))
    assert ok
    return buf.tobytes()
