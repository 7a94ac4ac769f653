"""Local image and mask files into arrays; unreadable files name themselves."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from anomalydino_core.images import ImageDecodeError
from tasks.image_files import read_image, read_mask


def test_missing_file_names_the_item(tmp_path):
    with pytest.raises(ImageDecodeError, match="missing.png"):
        read_image(tmp_path / "missing.png")


def test_image_and_mask_files_read_into_arrays(tmp_path):
    img = np.zeros((20, 30, 3), np.uint8) + 7
    Image.fromarray(img).save(tmp_path / "a.png")
    mask = np.zeros((20, 30), np.uint8)
    mask[5:10, 3:9] = 255
    Image.fromarray(mask).save(tmp_path / "a_mask.png")
    assert np.array_equal(read_image(tmp_path / "a.png"), img)
    got = read_mask(tmp_path / "a_mask.png", (20, 30))
    assert got.dtype == bool and got.sum() == 30
    with pytest.raises(ValueError, match="a_mask.png has size"):
        read_mask(tmp_path / "a_mask.png", (30, 20))
