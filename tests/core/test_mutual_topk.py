"""The streaming top-k engine of zero-shot scoring: tail sizes and per-patch tail statistics.

Its results against a dense reference, over block sizes, masks and query splits, are tested
through the public API in test_zero_shot.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from anomalydino_core.mutual_topk import tail_size, tail_statistic


def test_tail_size() -> None:
    assert tail_size("code_mean", 0.001, 84_992) == 84  # int(0.001 * M), as the authors' code
    assert tail_size("code_mean", 0.001, 999) == 1  # int() gives 0: at least 1
    assert tail_size("quantile", 0.001, 84_992) == 85  # ceil(alpha * M)
    assert tail_size("quantile", 0.001, 3000) == 3  # no float noise: 0.001 * 3000 -> 3
    assert tail_size("quantile", 0.5, 3) == 2
    with pytest.raises(ValueError):
        tail_size("code_mean", 0.001, 0)


def test_code_mean_without_values_below_the_kth_returns_the_kth() -> None:
    # k == 1: nothing strictly below the smallest -> the nearest-neighbour distance
    d = np.array([[0.3, 0.5, 0.9], [0.2, 0.2, 0.4]])
    np.testing.assert_allclose(tail_statistic(d, "code_mean", 1), [0.3, 0.2])
    # ties at the k-th smallest: the mean of what is strictly below, else the k-th itself
    np.testing.assert_allclose(tail_statistic(d, "code_mean", 2), [0.3, 0.2])
    np.testing.assert_allclose(tail_statistic(d, "code_mean", 3), [0.4, 0.2])
    np.testing.assert_allclose(tail_statistic(d, "quantile", 2), [0.5, 0.2])
    # bf16-rounded distances: ties are rounding artefacts, the k - 1 smallest are averaged
    np.testing.assert_allclose(tail_statistic(d, "code_mean", 3, quantized=True), [0.4, 0.2])
    np.testing.assert_allclose(tail_statistic(d, "code_mean", 1, quantized=True), [0.3, 0.2])
