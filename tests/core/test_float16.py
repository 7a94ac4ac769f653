"""float16 conversions: bit for bit numpy's, finiteness exactly numpy's float16 isfinite."""

from __future__ import annotations

import numpy as np
import pytest

from anomalydino_core.float16 import float16_checked, to_float16, to_float32

EDGES = np.array(
    [0.0, -0.0, 1e-8, 2.98e-8, 2.99e-8, 5.96e-8, 6.1e-5, 1.0 + 2**-11, 1.0 + 3 * 2**-11,
     65504.0, 65519.99, 65520.0, -65519.99, -65520.0, 1e6, np.inf, -np.inf, np.nan],
    dtype=np.float32,
)  # fmt: skip


def test_to_float16_rounds_exactly_like_numpy() -> None:
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32)
    wide = np.concatenate(
        [EDGES, rng.standard_normal(100_000) * 10.0 ** rng.integers(-9, 6, 100_000)]
    )
    with np.errstate(over="ignore", invalid="ignore"):
        wide = wide.astype(np.float32)
    # every float32 bit pattern class: subnormals, ties, NaN payloads
    values = np.concatenate([wide, bits.view(np.float32)]).reshape(-1, 2)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = values.astype(np.float16)
    got = to_float16(values)
    assert got.dtype == np.float16 and got.shape == values.shape
    both_nan = np.isnan(got) & np.isnan(expected)
    np.testing.assert_array_equal(
        got.view(np.uint16)[~both_nan], expected.view(np.uint16)[~both_nan]
    )
    assert np.array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_array_equal(to_float32(got), got.astype(np.float32))
    # float64 input: one rounding, like numpy (not float64 -> float32 -> float16)
    wide = np.float64(1.0) + 2.0**-11 + 2.0**-40  # just above a float16 tie
    assert to_float16(np.array([wide])).view(np.uint16)[0] == np.float16(wide).view(np.uint16)


@pytest.mark.parametrize("value", EDGES.tolist())
def test_finiteness_is_numpys_float16_isfinite(value: float) -> None:
    values = np.full((3, 4), 1.5, np.float32)
    values[1, 2] = value
    with np.errstate(over="ignore", invalid="ignore"):
        expected = bool(np.isfinite(values.astype(np.float16)).all())
    half, finite = float16_checked(values)
    assert finite is expected
    assert float16_checked(values.astype(np.float64))[1] is expected
    if expected:  # float16 input is checked too
        assert float16_checked(half)[1] is True
    read_only = values.copy()
    read_only.flags.writeable = False
    assert float16_checked(read_only)[1] is expected
