"""The CPU search kernels' final distances (``anomalydino_core.nn_search``)."""

from __future__ import annotations

import numpy as np
import torch

from anomalydino_core.nn_search import ROW_BLOCK, row_similarities


def test_row_similarities_are_the_same_dot_products_in_any_blocking() -> None:
    g = torch.Generator().manual_seed(0)
    n = 2 * ROW_BLOCK + 123  # three blocks, the last one short
    queries = torch.randn(n, 384, generator=g)
    bank = torch.randn(3000, 384, generator=g)
    idx = torch.randint(0, 3000, (n,), generator=g)
    got = row_similarities(queries, bank, idx)
    dense = (queries * bank[idx]).sum(dim=1).numpy()  # the unblocked reference
    assert got.dtype == np.float32 and got.shape == (n,)
    np.testing.assert_array_equal(got, dense)
    # a query's distance does not depend on the queries searched with it
    np.testing.assert_array_equal(row_similarities(queries[-7:], bank, idx[-7:]), dense[-7:])
    exact = np.einsum("nc,nc->n", queries.double().numpy(), bank[idx].double().numpy())
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-4)
