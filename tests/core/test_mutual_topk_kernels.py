"""Block kernels of the streaming top-k: tiles merged into a tail buffer keep the k smallest."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from anomalydino_core.mutual_topk_kernels import ALIGN, SHIFT, TailBuffer, key_dtype, update


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("axis", [1, 0])
@pytest.mark.parametrize("k", [1, 5, 40])
def test_streamed_tiles_keep_the_k_smallest(dtype: torch.dtype, axis: int, k: int) -> None:
    """Tiles of v = -(d + SHIFT), padded to ALIGN rows with -inf, queries along rows (axis 1)
    or along columns (axis 0): the buffer holds exactly the k smallest d of each row, ties
    (64 distance levels) and left-out (-inf) entries included."""
    rng = np.random.default_rng(k)
    valid, n_tiles, width = 50, 6, 128
    d = rng.integers(0, 64, size=(valid, n_tiles * width)) / 32.0
    v = torch.from_numpy(-(d + SHIFT)).to(dtype)
    v[:10, :100] = -math.inf  # e.g. the own image (Eq. 5)
    buffer = TailBuffer(valid, k, dtype, torch.device("cpu"))
    seen = 0
    for t in range(n_tiles):
        tile = torch.full((ALIGN, width), -math.inf, dtype=dtype)
        tile[:valid] = v[:, t * width : (t + 1) * width]
        if axis == 0:
            tile = tile.t().contiguous()
        update(buffer, tile.view(key_dtype(dtype)), axis, 0, valid, seen)
        seen += width
    expected = np.sort(-v.float().numpy().astype(np.float64) - SHIFT, axis=1)[:, :k]
    assert np.isfinite(expected).all()
    np.testing.assert_array_equal(buffer.smallest_distances(0, valid), expected)
