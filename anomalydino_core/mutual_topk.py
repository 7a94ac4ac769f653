"""Streaming top-k of mutual distances: the engine of batched zero-shot scoring (``zero_shot``).

For every query row (a foreground patch of a query image), the k smallest cosine distances to the
bank of all patches of all *other* images (Eq. 5), reduced to the per-patch tail statistic
(``tail_statistic``). The (queries x M) distance matrix is never held.

Rows are L2-normalised in fp32 and augmented with one constant column (+1 for queries, -1 - 2**-6
for the bank), so a single matmul gives v = cos - 1 - 2**-6 = -(d + 2**-6) < 0 directly (small
distances keep their relative precision in bf16, and all values are negative, see
``mutual_topk_kernels``). Per query row, a tail buffer of 2k values keeps the k largest v (k
smallest d) seen so far, and a tile only contributes the values strictly above the row's
threshold (``mutual_topk_kernels``: screening on integer keys, compaction, provisional
thresholds). The k largest values of a row form a multiset that does not depend on tile sizes,
merge order or on how the queries are split: the results equal a dense computation up to the
float rounding of the matmul.

- Tiles: the group's own query rows are compared with each other in symmetric tiles (the upper
  triangle of query blocks; one product serves both blocks, screened along rows and along
  columns), which halves the matmul work when all images are scored together; the rest of the
  bank (other images, masked patches) in (query block x bank block) tiles. Own-image entries
  (Eq. 5) are set to -inf in every tile.
- Memory: of the budget ``memory_budget_bytes``, B = 50 % is planned for (the rest covers
  transients and allocator slack); s = 4 bytes (fp32) or 2 (bf16), C' = C + 1, P = all patches.
  The bank cache (P * C' * s bytes) is kept when <= 0.4 B, else bank rows are re-read from the
  feature source for every query group. Tiles have E = min(2**24, 0.2 B / (s + 2)) elements
  (square blocks of floor64(sqrt(E)) rows, at least 64 and at least 4k) plus screening arrays.
  Query rows are processed in groups of (B - bank cache - E * (s + 2)) / ((2k + 2) * s + 8 +
  C' * s) rows (the tail buffer holds 2k + 1 keys of s bytes per row, plus the query row itself),
  at least one block. The budget covers the scorer's working memory, not the caller's features
  or the Python/torch runtime.

bf16 (``precision="bf16"``): bf16 inputs, fp32 accumulation, bf16 products (on CPU, torch has no
bf16 matmul with an fp32 result), i.e. v rounded to 8 significant bits. The rounding creates ties
at the k-th smallest distance that the authors' "strictly below" rule would turn into a bias
(-0.4 % on image scores); in bf16 ``code_mean`` therefore averages the k - 1 smallest (the rule's
result on untied values). Measured against fp32 (``bench/zero_shot.py --compare``, N = 83, 1024
patches x 384): image scores within 3e-4 relative (structured features; 9e-5 on random ones),
patch scores within 6e-4 absolute. fp32 is the default; bf16 is about 5x faster on CPUs with
AVX512-BF16 or AMX.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from anomalydino_core.choices import ComputePrecision as Precision
from anomalydino_core.choices import Statistic
from anomalydino_core.mutual_topk_kernels import (
    ALIGN,
    CAP_FACTOR,
    SHIFT,
    TailBuffer,
    key_dtype,
    update,
)

#: Largest tile of the (query x bank) product, in elements (32 MiB in bf16).
MAX_TILE_ELEMENTS = 2**24
_PLANNED = 0.5  # share of the budget planned for; the rest: transients, allocator slack, runtime


@runtime_checkable
class FeatureSource(Protocol):
    """Random access to per-image feature grids, e.g. backed by Zarr."""

    def __len__(self) -> int: ...

    def grid_shape(self, index: int) -> tuple[int, int]:
        """(gh, gw) of image ``index`` without loading it."""
        ...

    def load(self, index: int) -> np.ndarray:
        """The (gh, gw, C) float16/float32 grid of image ``index``."""
        ...


def tail_size(statistic: Statistic, alpha: float, bank_size: int) -> int:
    """k: how many of the smallest distances the statistic needs for a bank of M patches."""
    if bank_size < 1:
        raise ValueError("the bank is empty: batched zero-shot needs at least 2 images")
    if statistic == "code_mean":
        k = int(alpha * bank_size)  # exactly the authors' int(quantile * M)
    else:
        k = math.ceil(round(alpha * bank_size, 9))  # inverted-CDF rank, float noise removed
    return min(max(k, 1), bank_size)


def tail_statistic(
    smallest: np.ndarray, statistic: Statistic, k: int, *, quantized: bool = False
) -> np.ndarray:
    """Per-row statistic from the ascending smallest distances (rows x >= k), float64.

    ``quantized``: the distances are rounded (bf16), so ties at the k-th smallest are artefacts of
    the rounding; ``code_mean`` then averages the k - 1 smallest, which is what the authors' rule
    gives on untied values, instead of dropping every value tied with the k-th.
    """
    d = np.asarray(smallest, dtype=np.float64)[:, :k]
    kth = d[:, k - 1]
    if statistic == "quantile":
        return kth
    if quantized:
        return d[:, : k - 1].mean(axis=1) if k > 1 else kth
    below = d < kth[:, None]
    n_below = below.sum(axis=1)
    sums = np.where(below, d, 0.0).sum(axis=1)
    return np.where(n_below > 0, sums / np.maximum(n_below, 1), kth)


def tail_distances(
    source: FeatureSource,
    row_image: np.ndarray,
    row_patch: np.ndarray,
    ks: Mapping[int, int],
    *,
    dim: int,
    statistic: Statistic,
    precision: Precision,
    device: str,
    memory_budget_bytes: int,
    query_block_rows: int | None = None,
    bank_block_rows: int | None = None,
) -> np.ndarray:
    """Per query row, the tail statistic of its distances to the patches of the other images.

    ``row_image``, ``row_patch``: (R,) int64, the image of each query row and its flat (row-major)
    patch index in that image's (gh, gw) grid; the rows of an image are contiguous. ``ks``: k per
    query image (``tail_size``). ``dim``: C of the (gh, gw, C) grids. ``device``: "auto" (CUDA
    when available), "cpu", "cuda", ... ``query_block_rows`` / ``bank_block_rows`` override the
    block sizes planned from ``memory_budget_bytes``. Returns (R,) float32.
    """
    torch_device = _resolve_device(device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    k = max(ks.values())
    n_rows = int(row_image.size)
    distances = np.zeros(n_rows, dtype=np.float32)
    with torch.inference_mode():
        bank = _Bank(source, dim, dtype, torch_device)
        plan = _plan(
            precision,
            memory_budget_bytes,
            query_block_rows,
            bank_block_rows,
            bank.total,
            n_rows,
            dim,
            k,
        )
        if plan.cache_bank:
            bank.cache()
        for g0 in range(0, n_rows, plan.group_rows):
            g1 = min(n_rows, g0 + plan.group_rows)
            buffer = _tail_buffer(bank, row_image[g0:g1], row_patch[g0:g1], k, plan)
            for start, stop, img in _runs(row_image[g0:g1]):
                distances[g0 + start : g0 + stop] = tail_statistic(
                    buffer.smallest_distances(start, stop),
                    statistic,
                    ks[img],
                    quantized=dtype != torch.float32,
                )
    return distances


# ---------------------------------------------------------------------------------- internals


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _runs(labels: np.ndarray) -> list[tuple[int, int, int]]:
    """(start, stop, label) of the runs of equal consecutive labels."""
    if labels.size == 0:
        return []
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(labels)) + 1, [labels.size]])
    return [(int(a), int(b), int(labels[a])) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


class _Bank:
    """Normalised rows [x/|x|, -1 - shift] of all images (bank form), cached or re-read."""

    def __init__(
        self, source: FeatureSource, dim: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.source = source
        self.dim = dim
        self.dtype = dtype
        self.device = device
        sizes = [gh * gw for gh, gw in (source.grid_shape(i) for i in range(len(source)))]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.total = int(self.offsets[-1])
        self._cache: torch.Tensor | None = None

    def cache(self) -> None:
        """Load every image once and keep the bank rows (P x (C + 1)) in memory."""
        self._cache = torch.empty(self.total, self.dim + 1, dtype=self.dtype, device=self.device)
        for i in range(len(self.source)):
            self._cache[self.offsets[i] : self.offsets[i + 1]] = self._load(i)

    def _load(self, index: int) -> torch.Tensor:
        grid = self.source.load(index)
        gh, gw = self.source.grid_shape(index)
        if grid.ndim != 3 or grid.shape[:2] != (gh, gw) or grid.shape[2] != self.dim:
            raise ValueError(f"image {index}: expected a ({gh}, {gw}, {self.dim}) grid")
        x = torch.from_numpy(np.ascontiguousarray(grid.reshape(gh * gw, self.dim)))
        x = torch.nn.functional.normalize(x.to(self.device, torch.float32), dim=1)
        rows = torch.empty(gh * gw, self.dim + 1, dtype=self.dtype, device=self.device)
        rows[:, : self.dim] = x
        rows[:, self.dim] = -1.0 - SHIFT  # exact in bf16
        return rows

    def image_rows(self, index: int) -> torch.Tensor:
        if self._cache is not None:
            return self._cache[self.offsets[index] : self.offsets[index + 1]]
        return self._load(index)

    def gather(self, rows: np.ndarray, out: torch.Tensor) -> None:
        """Write the bank rows with global indices ``rows`` (ascending) to ``out[: len(rows)]``."""
        if self._cache is not None:
            idx = torch.from_numpy(rows).to(self.device)
            torch.index_select(self._cache, 0, idx, out=out[: rows.size])
            return
        images = np.searchsorted(self.offsets, rows, side="right") - 1
        for start, stop, img in _runs(images):
            local = torch.from_numpy(rows[start:stop] - self.offsets[img]).to(self.device)
            out[start:stop] = self._load(img)[local]


@dataclass(frozen=True)
class _Plan:
    query_block: int
    bank_block: int
    group_rows: int
    cache_bank: bool


def budget_side(precision: Precision, memory_budget_bytes: int, k: int) -> int:
    """The square tile side the budget allows (see the module docstring: Memory)."""
    s = 2 if precision == "bf16" else 4
    elements = int(min(MAX_TILE_ELEMENTS, 0.2 * _PLANNED * memory_budget_bytes / (s + 2)))
    # at least 4k columns per tile, so that a first tile yields a tight provisional threshold
    return max(ALIGN, math.isqrt(elements) // ALIGN * ALIGN, _round_up(4 * k, ALIGN))


def _plan(
    precision: Precision,
    memory_budget_bytes: int,
    query_block_rows: int | None,
    bank_block_rows: int | None,
    total: int,
    query_rows: int,
    dim: int,
    k: int,
) -> _Plan:
    s = 2 if precision == "bf16" else 4  # bytes per tile value, per buffered key
    budget = _PLANNED * memory_budget_bytes
    bank_bytes = total * (dim + 1) * s
    cache_bank = bank_bytes <= 0.4 * budget
    elements = int(min(MAX_TILE_ELEMENTS, 0.2 * budget / (s + 2)))
    side = budget_side(precision, memory_budget_bytes, k)
    query_block = query_block_rows or side
    bank_block = bank_block_rows or side
    per_row = (int(CAP_FACTOR * k) + 2) * s + 8 + (dim + 1) * s  # tail buffer, query row
    left = budget - (bank_bytes if cache_bank else 0) - elements * (s + 2)
    group_rows = max(query_block, int(left // per_row) // query_block * query_block)
    group_rows = min(group_rows, _round_up(max(query_rows, 1), query_block))
    return _Plan(query_block, bank_block, group_rows, cache_bank)


def _tail_buffer(
    bank: _Bank, row_image: np.ndarray, row_patch: np.ndarray, k: int, plan: _Plan
) -> TailBuffer:
    """The k smallest distances of a group of query rows to their banks, in a tail buffer.

    The bank of the group is split into the group's own query rows (symmetric tiles: one product
    serves both blocks, screened along rows and along columns) and the rest (all other bank rows:
    other images, masked patches), screened along rows only.
    """
    n = int(row_image.size)
    dim, dtype, device = bank.dim, bank.dtype, bank.device
    qb, bb = plan.query_block, plan.bank_block
    queries = torch.zeros(_round_up(n, ALIGN) + ALIGN, dim + 1, dtype=dtype, device=device)
    query_runs = _runs(row_image)  # one run per image
    for start, stop, img in query_runs:
        local = torch.from_numpy(row_patch[start:stop]).to(device)
        queries[start:stop] = bank.image_rows(img)[local]
    queries[:, dim] = 1.0
    global_rows = bank.offsets[row_image] + row_patch
    is_query = np.zeros(bank.total, dtype=bool)
    is_query[global_rows] = True
    rest = np.flatnonzero(~is_query)
    rest_image = np.searchsorted(bank.offsets, rest, side="right") - 1
    span = {img: (start, stop) for start, stop, img in query_runs}

    buffer = TailBuffer(n, k, dtype, device)
    blocks = [(a, min(n, a + qb)) for a in range(0, n, qb)]
    block_runs = [[run for run in query_runs if run[0] < r1 and run[1] > r0] for r0, r1 in blocks]
    seen = [0] * len(blocks)
    height = _round_up(qb, ALIGN)
    width_max = _round_up(max(qb, bb), ALIGN)
    columns = torch.zeros(width_max, dim + 1, dtype=dtype, device=device)
    tile_buf = torch.empty(height * width_max, dtype=dtype, device=device)

    def product(r0: int, r1: int, nb: int) -> torch.Tensor:
        h, w = _round_up(r1 - r0, ALIGN), _round_up(nb, ALIGN)
        tile = tile_buf[: h * w].view(h, w)
        torch.mm(queries[r0 : r0 + h], columns[:w].t(), out=tile)
        tile[r1 - r0 :] = -math.inf
        tile[:, nb:] = -math.inf
        return tile

    # 1) query rows against query rows: symmetric tiles, the upper triangle of blocks. The
    #    diagonal tile comes first, so that the first (threshold-less) pass of every block is along
    #    rows, the cheaper direction.
    for bj, (c0, c1) in enumerate(blocks):
        columns[: c1 - c0] = queries[c0:c1]
        columns[: c1 - c0, dim] = -1.0 - SHIFT
        for bi in [bj, *range(bj)]:
            r0, r1 = blocks[bi]
            tile = product(r0, r1, c1 - c0)
            for start, stop, _ in block_runs[bi]:  # Eq. 5: not against the own image
                lo_r, hi_r = max(start, r0), min(stop, r1)
                lo_c, hi_c = max(start, c0), min(stop, c1)
                if lo_r < hi_r and lo_c < hi_c:
                    tile[lo_r - r0 : hi_r - r0, lo_c - c0 : hi_c - c0] = -math.inf
            keys = tile.view(key_dtype(dtype))
            update(buffer, keys, 1, r0, r1 - r0, seen[bi])
            seen[bi] += c1 - c0
            if bi != bj:
                update(buffer, keys, 0, c0, c1 - c0, seen[bj])
                seen[bj] += r1 - r0

    # 2) query rows against the rest of the bank
    for b0 in range(0, rest.size, bb):
        b1 = min(rest.size, b0 + bb)
        bank.gather(rest[b0:b1], columns)
        own = [(a + b0, b + b0, img) for a, b, img in _runs(rest_image[b0:b1]) if img in span]
        for bi, (r0, r1) in enumerate(blocks):
            tile = product(r0, r1, b1 - b0)
            for c0, c1, img in own:
                lo_r, hi_r = max(span[img][0], r0), min(span[img][1], r1)
                if lo_r < hi_r:
                    tile[lo_r - r0 : hi_r - r0, c0 - b0 : c1 - b0] = -math.inf
            update(buffer, tile.view(key_dtype(dtype)), 1, r0, r1 - r0, seen[bi])
            seen[bi] += b1 - b0
    return buffer
