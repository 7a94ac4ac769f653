"""The decode guard: sizes from headers only, hostile bytes never escape as anything but
``ImageDecodeError``, and refused images never allocate their pixels."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from anomalydino_core.config import ModelSettings
from anomalydino_core.images import (
    DECODE_MAX_PIXELS,
    ImageDecodeError,
    ImageSizeError,
    check_image_size,
    decode_image,
    header_size,
)
from tests.core.images_data import jpeg_bytes, jpeg_with_header, png_with_header, zeros_png

REPO = Path(__file__).resolve().parents[2]


def test_png_bomb_header_is_refused_before_decoding() -> None:
    data = png_with_header(60000, 60000)
    assert len(data) < 200 and header_size(data) == (60000, 60000)
    with pytest.raises(ImageSizeError) as err:
        decode_image(data, "img.png")
    assert str(err.value) == (
        f"img.png: 60000 x 60000 = 3.6 G pixels exceeds the limit of {DECODE_MAX_PIXELS:,} "
        "pixels (decode_max_pixels)"
    )


def test_jpeg_bomb_header_is_refused_before_decoding() -> None:
    data = jpeg_with_header(60000, 60000)
    assert header_size(data) == (60000, 60000)
    with pytest.raises(ImageSizeError, match=r"bomb.jpg: 60000 x 60000 = 3\.6 G pixels exceeds"):
        decode_image(data, "bomb.jpg")


def test_other_formats_are_checked_from_pils_header() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (300, 200)).save(buf, format="BMP")
    with pytest.raises(ImageSizeError, match=r"x.bmp: 300 x 200 = 60 k pixels exceeds .* 50,000"):
        decode_image(buf.getvalue(), "x.bmp", max_pixels=50_000)
    assert decode_image(buf.getvalue(), "x.bmp").shape == (200, 300, 3)


def test_limit_is_a_setting_and_applies_exactly() -> None:
    assert ModelSettings().decode_max_pixels == DECODE_MAX_PIXELS == 8192 * 8192
    data = jpeg_bytes(40, 30)
    assert decode_image(data, "ok.jpg", max_pixels=1200).shape == (30, 40, 3)
    with pytest.raises(ImageSizeError, match="limit of 1,199 pixels"):
        decode_image(data, "big.jpg", max_pixels=1199)


def test_images_smaller_than_a_patch_or_too_elongated_are_refused() -> None:
    small = png_with_header(8, 40, idat=b"")
    with pytest.raises(ImageSizeError, match=r"tiny.png: 8 x 40 pixels is smaller than one 16 px"):
        decode_image(small, "tiny.png", min_edge=16)
    with pytest.raises(ImageSizeError, match=r"0 x 5 pixels is smaller than one pixel"):
        decode_image(png_with_header(0, 5), "zero.png")
    with pytest.raises(ImageSizeError, match="aspect ratio of 20:1"):
        check_image_size(20, 400, "strip.png")
    check_image_size(20, 320, "strip.png", min_edge=14)  # 16:1 is fine


def test_twenty_thousand_squared_zeros_png_stays_bounded(tmp_path: Path) -> None:
    """A 1 MB PNG claiming 400 M pixels: refused from its header; the decode's peak RSS grows
    by less than the file's size x 20 (it once peaked at 10.8 GB through the pipeline)."""
    path = tmp_path / "zeros.png"
    path.write_bytes(zeros_png(20000, 20000))
    script = f"""
import json, resource, sys
from anomalydino_core.images import ImageSizeError, decode_image
from tests.core.images_data import jpeg_bytes
decode_image(jpeg_bytes(), "warm-up.jpg")
data = open({str(path)!r}, "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    decode_image(data, "zeros.png")
    outcome = "decoded"
except ImageSizeError as exc:
    outcome = str(exc)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"outcome": outcome, "grew_kib": after - before, "bytes": len(data)}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(result)
    assert result["outcome"].startswith("zeros.png: 20000 x 20000 = 400 M pixels exceeds")
    assert result["grew_kib"] * 1024 < 20 * result["bytes"]


def test_integer_16_bit_scaling_equals_the_float_formula_for_every_value() -> None:
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, format="PNG")
    out = decode_image(buf.getvalue(), "all16.png")
    assert np.array_equal(out[..., 1], np.rint(values / 65535.0 * 255).astype(np.uint8))


def test_cmyk_and_grey_jpegs_decode_to_rgb() -> None:
    for mode in ("CMYK", "L", "RGB"):
        out = decode_image(jpeg_bytes(24, 20, mode), f"{mode}.jpg")
        assert out.dtype == np.uint8 and out.shape == (20, 24, 3)


def _check(data: bytes, **kwargs) -> None:
    try:
        out = decode_image(data, "h.img", **kwargs)
    except ImageDecodeError as exc:
        assert str(exc).startswith("h.img: ")
        return
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8
    assert out.ndim == 3 and out.shape[2] == 3 and out.shape[0] >= 1 and out.shape[1] >= 1


_FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_never_crash(data: bytes) -> None:
    _check(data)
    _check(png_with_header(3, 3)[:8] + data)
    _check(b"\xff\xd8" + data)


@_FUZZ
@given(
    width=st.integers(0, 2**32 - 1),
    height=st.integers(0, 2**32 - 1),
    bit_depth=st.sampled_from([1, 2, 4, 8, 16, 0, 3, 255]),
    colour=st.sampled_from([0, 2, 3, 4, 6, 1, 7]),
    idat=st.binary(max_size=512),
    compress=st.booleans(),
)
def test_random_png_headers_never_crash(width, height, bit_depth, colour, idat, compress) -> None:
    payload = zlib.compress(idat) if compress else idat
    _check(png_with_header(width, height, bit_depth=bit_depth, colour=colour, idat=payload))
    small = png_with_header(width % 64, height % 64, bit_depth=bit_depth, colour=colour)
    _check(small, max_pixels=4096)


@_FUZZ
@given(
    width=st.integers(0, 65535),
    height=st.integers(0, 65535),
    cut=st.integers(0, 4096),
    junk=st.binary(max_size=64),
)
def test_random_jpeg_headers_never_crash(width, height, cut, junk) -> None:
    data = jpeg_with_header(width, height)
    _check(data, max_pixels=1_000_000)
    _check(data[:cut] + junk, max_pixels=1_000_000)
