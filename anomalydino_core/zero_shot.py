"""Batched zero-shot mutual scoring (METHOD.md section 4, supplementary D, Eq. 5-7).

Every query image j is scored against the bank M_j of all patches of all *other* images of the
batch (Eq. 5). For a query patch, D is the set of its cosine distances to M_j (Eq. 6), M = |M_j|.

Statistics (``MutualScoringConfig.statistic``):

- ``code_mean`` (default, the authors' code): k = int(alpha * M) (at least 1); the mean of the
  distances strictly below the k-th smallest. When nothing lies strictly below it (k == 1, or the
  k smallest are tied), the authors' code divides 0 by 0 (NaN); we return the k-th smallest itself.
- ``quantile`` (Eq. 7): max(L_alpha(D)), the empirical alpha-quantile D_(k) with
  k = ceil(alpha * M) (at least 1), i.e. ``np.quantile(D, alpha, method="inverted_cdf")``.

Masked-out patches of the scored image get distance 0 (as in few-shot scoring); they still count
in the image score. The bank always holds every patch of the other images (as in the code).

Computation. The (queries x M) distance matrix is never held. Rows are L2-normalised in fp32 and
augmented with one constant column (+1 for queries, -1 - 2**-6 for the bank), so a single matmul
gives v = cos - 1 - 2**-6 = -(d + 2**-6) < 0 directly (small distances keep their relative
precision in bf16, and all values are negative, see below). Per query row, a buffer of 2k values
keeps the k largest v (k smallest d) seen so far; its k-th largest is the row's threshold, and a
tile only contributes the values strictly above it (values equal to it cannot change the top-k
multiset). The buffer is compacted with ``torch.topk`` when full. Before a row has k values, a
provisional threshold from the tile itself is used: the k-th largest of its group maxima (k
distinct entries, so a valid lower bound). The k largest values of a row form a multiset that
does not depend on tile sizes, merge order or on how the queries are split: the results equal a
dense computation up to the float rounding of the matmul.

- Screening: negative floats read as integers are ordered in reverse, so "v > t" becomes
  "key(v) < key(t)"; one vectorised integer min over strided column groups (several times faster
  than a float max on CPU) finds the few groups holding candidates, whose members are gathered.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch

from anomalydino_core.scoring import IMAGE_SCORE_METHODS, MAP_SIGMA, anomaly_map, image_score

Statistic = Literal["code_mean", "quantile"]
Precision = Literal["fp32", "bf16"]

#: Default lower-tail fraction alpha (0.1 %).
DEFAULT_ALPHA = 0.001
#: Largest tile of the (query x bank) product, in elements (32 MiB in bf16).
MAX_TILE_ELEMENTS = 2**24
_ALIGN = 64  # block sizes are multiples of this (largest screening group size)
_SHIFT = 2.0**-6  # v = cos - 1 - _SHIFT < 0 strictly, also after bf16 rounding of the inputs
_LOW = -4.0  # below every possible v (>= -2 - _SHIFT); thresholds are clamped to it
_SKIP = -0.0  # a threshold no (negative) value passes
_CAP_FACTOR = 2.0  # tail buffer width, in units of k
_PLANNED = 0.5  # share of the budget planned for; the rest: transients, allocator slack, runtime


@dataclass(frozen=True)
class MutualScoringConfig:
    """Settings of batched zero-shot scoring.

    ``query_block_rows`` / ``bank_block_rows`` override the block sizes derived from the budget
    (for tests and tuning); the results do not depend on them beyond float rounding.
    """

    statistic: Statistic = "code_mean"
    alpha: float = DEFAULT_ALPHA
    memory_budget_bytes: int = 2 * 2**30
    precision: Precision = "fp32"
    device: str = "auto"
    image_score: str = "top1p_mean"
    sigma: float = MAP_SIGMA
    query_block_rows: int | None = None
    bank_block_rows: int | None = None

    def __post_init__(self) -> None:
        if self.statistic not in ("code_mean", "quantile"):
            raise ValueError(f"unknown statistic {self.statistic!r}")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"unknown precision {self.precision!r}")
        if self.image_score not in IMAGE_SCORE_METHODS:
            raise ValueError(f"unknown image score {self.image_score!r}")
        if self.memory_budget_bytes <= 0:
            raise ValueError("memory_budget_bytes must be positive")
        for name in ("query_block_rows", "bank_block_rows"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1")


@dataclass(frozen=True)
class ZeroShotResult:
    """Scores of one query image; ``patch_scores`` and ``anomaly_map`` are float32."""

    index: int
    score: float
    patch_scores: np.ndarray  # (gh, gw)
    anomaly_map: np.ndarray | None  # (H, W), None without image sizes
    max_patch: tuple[int, int]  # (row, col) of the largest patch score


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


@dataclass(frozen=True)
class ArrayFeatureSource:
    """A FeatureSource over grids already in memory."""

    grids: Sequence[np.ndarray]

    def __len__(self) -> int:
        return len(self.grids)

    def grid_shape(self, index: int) -> tuple[int, int]:
        shape = self.grids[index].shape
        return int(shape[0]), int(shape[1])

    def load(self, index: int) -> np.ndarray:
        return np.asarray(self.grids[index])


@dataclass(frozen=True)
class LazyFeatureSource:
    """A FeatureSource from known grid shapes and a loader called on demand."""

    grid_shapes: Sequence[tuple[int, int]]
    loader: Callable[[int], np.ndarray]

    def __len__(self) -> int:
        return len(self.grid_shapes)

    def grid_shape(self, index: int) -> tuple[int, int]:
        gh, gw = self.grid_shapes[index]
        return int(gh), int(gw)

    def load(self, index: int) -> np.ndarray:
        grid = np.asarray(self.loader(index))
        if grid.shape[:2] != self.grid_shape(index):
            raise ValueError(
                f"image {index}: loaded grid {grid.shape[:2]} != declared {self.grid_shape(index)}"
            )
        return grid


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


def split_query_indices(n_images: int, n_parts: int) -> list[list[int]]:
    """Contiguous, nearly equal query subsets for independent tasks (empty parts dropped)."""
    bounds = np.linspace(0, n_images, max(1, n_parts) + 1).round().astype(int)
    return [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


# ---------------------------------------------------------------------------------- internals


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _pow2_floor(value: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(value, 1.0)))))


def _runs(labels: np.ndarray) -> list[tuple[int, int, int]]:
    """(start, stop, label) of the runs of equal consecutive labels."""
    if labels.size == 0:
        return []
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(labels)) + 1, [labels.size]])
    return [(int(a), int(b), int(labels[a])) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


class _Bank:
    """Normalised rows [x/|x|, -1 - shift] of all images (bank form), cached or re-read."""

    def __init__(
        self, source: FeatureSource, dim: int, dtype: torch.dtype, device: torch.device, cache: bool
    ) -> None:
        self.source = source
        self.dim = dim
        self.dtype = dtype
        self.device = device
        sizes = [gh * gw for gh, gw in (source.grid_shape(i) for i in range(len(source)))]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.total = int(self.offsets[-1])
        self._cache: torch.Tensor | None = None
        if cache:
            self._cache = torch.empty(self.total, dim + 1, dtype=dtype, device=device)
            for i in range(len(source)):
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
        rows[:, self.dim] = -1.0 - _SHIFT  # exact in bf16
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


class _TailBuffer:
    """Per query row, a buffer of 2k + 1 keys keeping the k largest v = -(d + shift) so far.

    Values are kept as the integer keys of the tile dtype (see ``_screen``: a smaller key is a
    larger value), so bf16 buffers take 2 bytes per value and need no conversion.
    """

    def __init__(self, rows: int, k: int, dtype: torch.dtype, device: torch.device) -> None:
        self.k = k
        self.cap = int(_CAP_FACTOR * k) + 1
        self.dtype = dtype
        key_dtype = _key_dtype(dtype)
        #: the key of -inf: the largest (worst) key, marks empty slots and missing thresholds
        self.empty = int(torch.tensor(-math.inf, dtype=dtype).view(key_dtype))
        self.keys = torch.full((rows, self.cap), self.empty, dtype=key_dtype, device=device)
        self.count = torch.zeros(rows, dtype=torch.int64, device=device)
        #: key of a lower bound of each row's final k-th largest v; ``empty`` until k values
        self.thr = torch.full((rows,), self.empty, dtype=key_dtype, device=device)

    def insert(self, rows: torch.Tensor, keys: torch.Tensor) -> None:
        """Add candidate ``keys`` of buffer ``rows`` (ascending)."""
        if rows.numel() == 0:
            return
        uniq, counts = torch.unique_consecutive(rows, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(rows.numel(), device=rows.device) - torch.repeat_interleave(
            starts, counts
        )
        base = self.count.index_select(0, uniq)
        # append where there is room; rows without a threshold yet are compacted to get one
        fits = (base + counts <= self.cap) & (self.thr.index_select(0, uniq) != self.empty)
        slot = rows * self.cap + torch.repeat_interleave(base, counts) + rank
        if bool(fits.all()):
            self.keys.view(-1).index_copy_(0, slot, keys)
            self.count.index_add_(0, uniq, counts)
            return
        fits_each = torch.repeat_interleave(fits, counts)
        if bool(fits.any()):
            self.keys.view(-1).index_copy_(0, slot[fits_each], keys[fits_each])
            self.count.index_add_(0, uniq[fits], counts[fits])
        over = ~fits
        self._compact(uniq[over], counts[over], keys[~fits_each], rank[~fits_each])

    def _compact(
        self, rows: torch.Tensor, counts: torch.Tensor, keys: torch.Tensor, rank: torch.Tensor
    ) -> None:
        """Replace the buffers of ``rows`` by the k best of buffer + candidates."""
        device = rows.device
        row_of = torch.repeat_interleave(torch.arange(rows.numel(), device=device), counts)
        bucket = torch.ceil(torch.log2(counts.to(torch.float64))).to(torch.int64)
        for b in torch.unique(bucket).tolist():
            sel = bucket == b  # rows whose candidate count is in (2^(b-1), 2^b]
            sel_idx = torch.nonzero(sel).squeeze(1)
            local = torch.full_like(sel, -1, dtype=torch.int64)
            local[sel_idx] = torch.arange(sel_idx.numel(), device=device)
            pick = torch.nonzero(sel[row_of]).squeeze(1)
            width = 1 << b
            pad = torch.full((sel_idx.numel(), width), self.empty, dtype=keys.dtype, device=device)
            slot = local[row_of[pick]] * width + rank[pick]
            pad.view(-1).index_copy_(0, slot, keys[pick])
            r = rows[sel_idx]
            merged = torch.cat([self.keys.index_select(0, r), pad], dim=1)
            top = torch.topk(merged, self.k, dim=1, largest=False, sorted=False).values
            merged[:, : self.k] = top
            merged[:, self.k : self.cap] = self.empty
            self.keys.index_copy_(0, r, merged[:, : self.cap])
            self.count.index_fill_(0, r, self.k)
            self.thr.index_copy_(0, r, top.amax(dim=1))

    def smallest_distances(self, start: int, stop: int) -> np.ndarray:
        """The k smallest distances of rows ``start .. stop``, ascending (float64)."""
        top = torch.topk(self.keys[start:stop], self.k, dim=1, largest=False, sorted=True)
        v = top.values.view(self.dtype).float().cpu().numpy().astype(np.float64)
        return -v - _SHIFT


def _key_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.int16 if dtype == torch.bfloat16 else torch.int32


def _group_keys(keys: torch.Tensor, axis: int, group: int) -> torch.Tensor:
    """Min key over ``group`` strided bank positions along tile ``axis``; the queries stay on
    the other axis: (queries, groups) for axis 1, (groups, queries) for axis 0.

    Bank position p is in group p mod (length / group): the reduction runs over a middle or
    outer dimension, contiguous in memory, which vectorises well.
    """
    if group == 1:
        return keys
    if axis == 1:
        n_q, length = keys.shape
        return keys.view(n_q, group, length // group).amin(dim=1)
    length, n_q = keys.shape
    return keys.view(group, length // group, n_q).amin(dim=0)


def _screen(
    keys: torch.Tensor, axis: int, group: int, limit: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(queries, keys) of the tile entries with key < the query's ``limit``, queries ascending.

    Tile values are negative (or -inf), so their bit patterns read as integers order them in
    reverse: "v > t" is "key(v) < key(t)", and integer min-reductions are several times faster
    than float max-reductions on CPU. One pass takes the min key per group of bank positions; only
    the members of passing groups are gathered and compared.
    """
    width = keys.shape[1]
    gk = _group_keys(keys, axis, group)
    # queries along columns: transpose the (small) mask to get the hits grouped by query
    hit_mask = gk < limit[:, None] if axis == 1 else (gk < limit[None, :]).t().contiguous()
    g_len = hit_mask.shape[1]
    hit = torch.nonzero(hit_mask.view(-1)).squeeze(1)
    if hit.numel() == 0:
        return hit, keys.new_empty(0)
    q = torch.div(hit, g_len, rounding_mode="floor")
    if axis == 1:  # member j of group (q, p): tile[q, p + j * g_len]
        base = hit + q * (width - g_len)
        step = g_len
    else:  # member j of group (q, p): tile[p + j * g_len, q]
        base = (hit - q * g_len) * width + q
        step = g_len * width
    flat = base[:, None] + torch.arange(0, group * step, step, device=keys.device)
    cand = torch.take(keys, flat)  # (hits, group)
    p = torch.nonzero((cand < limit.index_select(0, q)[:, None]).view(-1)).squeeze(1)
    return q.index_select(0, torch.div(p, group, rounding_mode="floor")), cand.view(-1)[p]


def _provisional(keys: torch.Tensor, axis: int, k: int) -> torch.Tensor:
    """Per query, a limit passing (at least) the entries >= its k-th largest tile value.

    The k largest group maxima are k distinct entries, so their minimum is a valid lower bound;
    small groups (about 4k of them or more) keep it tight. At least -4 (all finite values).
    """
    length, n_q = keys.shape[axis], keys.shape[1 - axis]
    low = torch.tensor(_LOW, dtype=_dtype_of_keys(keys)).view(keys.dtype)
    group = min(_ALIGN, _pow2_floor(length / (4 * k)))
    while group > 1 and length // group < k:
        group //= 2
    if length // group < k:
        return torch.full((n_q,), int(low) + 1, dtype=keys.dtype, device=keys.device)
    gk = _group_keys(keys, axis, group)
    dim = 1 if axis == 1 else 0
    kth = torch.topk(gk, k, dim=dim, largest=False, sorted=False).values.amax(dim=dim)
    return torch.minimum(kth, low.to(keys.device)) + 1  # -inf (too few values) -> -4; "<="


def _dtype_of_keys(keys: torch.Tensor) -> torch.dtype:
    return torch.bfloat16 if keys.dtype == torch.int16 else torch.float32


def _group_size(length: int, candidates: float) -> int:
    """Screening group size balancing the scan of group minima against the gather of members.

    Per query: about length / group group minima to compare and collect (~2 ns each) against
    candidates * group members to gather (~5 ns each, random access).
    """
    group = min(_ALIGN, _pow2_floor(math.sqrt(0.4 * length / max(candidates, 1.0))))
    while length % group:
        group //= 2
    return group


def _update(
    buffer: _TailBuffer,
    keys: torch.Tensor,
    axis: int,
    first: int,
    valid: int,
    seen: int,
) -> None:
    """Merge one tile into buffer rows ``first .. first + valid`` (bank positions along ``axis``).

    ``seen``: bank entries these queries have already been compared with (for the group size).
    """
    length, n_q = keys.shape[axis], keys.shape[1 - axis]
    k = buffer.k
    thr = buffer.thr[first : first + valid]
    fresh = thr == buffer.empty  # no k values yet: a threshold from this tile
    n_fresh = int(fresh.sum())
    skip = torch.tensor(_SKIP, dtype=buffer.dtype).view(keys.dtype).to(keys.device)
    if n_fresh:
        t0 = _provisional(keys, axis, k)
        if n_fresh < valid:
            t0[:valid] = torch.where(fresh, t0[:valid], skip)
        t0[valid:] = skip
        q, cand = _screen(keys, axis, _group_size(length, 1.2 * k), t0)
        buffer.insert(q + first, cand)
    if n_fresh < valid:
        # strictly above the k-th largest: values equal to it cannot change the top-k multiset
        t = torch.where(fresh, skip, thr) if n_fresh else thr
        t = torch.cat([t, skip.expand(n_q - valid)]) if n_q > valid else t
        group = _group_size(length, 1.5 * k * length / max(seen, length))
        q, cand = _screen(keys, axis, group, t)
        buffer.insert(q + first, cand)


@dataclass(frozen=True)
class _Plan:
    query_block: int
    bank_block: int
    group_rows: int
    cache_bank: bool


def _plan(config: MutualScoringConfig, total: int, query_rows: int, dim: int, k: int) -> _Plan:
    s = 2 if config.precision == "bf16" else 4  # bytes per tile value, per buffered key
    budget = _PLANNED * config.memory_budget_bytes
    bank_bytes = total * (dim + 1) * s
    cache_bank = bank_bytes <= 0.4 * budget
    elements = int(min(MAX_TILE_ELEMENTS, 0.2 * budget / (s + 2)))
    # at least 4k columns per tile, so that a first tile yields a tight provisional threshold
    side = max(_ALIGN, math.isqrt(elements) // _ALIGN * _ALIGN, _round_up(4 * k, _ALIGN))
    query_block = config.query_block_rows or side
    bank_block = config.bank_block_rows or side
    per_row = (int(_CAP_FACTOR * k) + 2) * s + 8 + (dim + 1) * s  # tail buffer, query row
    left = budget - (bank_bytes if cache_bank else 0) - elements * (s + 2)
    group_rows = max(query_block, int(left // per_row) // query_block * query_block)
    group_rows = min(group_rows, _round_up(max(query_rows, 1), query_block))
    return _Plan(query_block, bank_block, group_rows, cache_bank)


# ------------------------------------------------------------------------------------ public


def score_mutual(
    features: Sequence[np.ndarray] | FeatureSource,
    *,
    query_indices: Sequence[int] | None = None,
    masks: Sequence[np.ndarray | None] | None = None,
    image_sizes: Sequence[tuple[int, int]] | None = None,
    config: MutualScoringConfig | None = None,
) -> list[ZeroShotResult]:
    """Score ``query_indices`` (default: all images) against the whole batch (Eq. 5-7).

    ``features``: per-image (gh, gw, C) grids or a FeatureSource (read lazily). ``masks``:
    per-image (gh, gw) foreground masks or None (indexed like ``features``; only the queries'
    are used). ``image_sizes``: per-image (H, W) for anomaly maps (no maps without them).
    Splitting the queries over several calls gives the same numbers as one call.
    """
    config = config or MutualScoringConfig()
    source = features if isinstance(features, FeatureSource) else ArrayFeatureSource(features)
    n_images = len(source)
    if n_images < 2:
        raise ValueError("batched zero-shot scoring needs at least 2 images")
    queries = list(range(n_images)) if query_indices is None else [int(i) for i in query_indices]
    if any(not 0 <= i < n_images for i in queries):
        raise IndexError("query index out of range")
    if len(set(queries)) != len(queries):
        raise ValueError("duplicate query indices")
    if masks is not None and len(masks) != n_images:
        raise ValueError("masks must have one entry (or None) per image")
    if image_sizes is not None and len(image_sizes) != n_images:
        raise ValueError("image_sizes must have one entry per image")
    if config.image_score == "max_map" and image_sizes is None:
        raise ValueError("image score 'max_map' needs image_sizes")
    if not queries:
        return []

    device = _resolve_device(config.device)
    dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
    shapes = [source.grid_shape(i) for i in range(n_images)]
    total = sum(gh * gw for gh, gw in shapes)
    ks = {
        i: tail_size(config.statistic, config.alpha, total - shapes[i][0] * shapes[i][1])
        for i in queries
    }
    k = max(ks.values())

    # foreground rows of the queries, concatenated image after image
    fg: dict[int, np.ndarray] = {}
    for i in queries:
        gh, gw = shapes[i]
        mask = None if masks is None else masks[i]
        if mask is None:
            fg[i] = np.arange(gh * gw)
        else:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != (gh, gw):
                raise ValueError(f"image {i}: mask {mask.shape} != grid {(gh, gw)}")
            fg[i] = np.flatnonzero(mask.ravel())
    row_image = np.concatenate([np.full(fg[i].size, i, dtype=np.int64) for i in queries])
    row_patch = np.concatenate([fg[i] for i in queries]).astype(np.int64)
    n_rows = int(row_image.size)

    distances = np.zeros(n_rows, dtype=np.float32)
    with torch.inference_mode():
        first = next((i for i in queries if fg[i].size), queries[0])
        dim = int(source.load(first).shape[2])
        plan = _plan(config, total, n_rows, dim, k)
        bank = _Bank(source, dim, dtype, device, plan.cache_bank)
        for g0 in range(0, n_rows, plan.group_rows):
            g1 = min(n_rows, g0 + plan.group_rows)
            buffer = _tail_buffer(bank, row_image[g0:g1], row_patch[g0:g1], k, plan)
            for start, stop, img in _runs(row_image[g0:g1]):
                distances[g0 + start : g0 + stop] = tail_statistic(
                    buffer.smallest_distances(start, stop),
                    config.statistic,
                    ks[img],
                    quantized=dtype != torch.float32,
                )

    results: list[ZeroShotResult] = []
    pos = 0
    for i in queries:
        gh, gw = shapes[i]
        grid = np.zeros(gh * gw, dtype=np.float32)
        grid[fg[i]] = distances[pos : pos + fg[i].size]
        pos += fg[i].size
        grid = grid.reshape(gh, gw)
        amap = None
        if image_sizes is not None:
            amap = anomaly_map(grid, tuple(image_sizes[i]), sigma=config.sigma)
        score = image_score(grid.ravel(), config.image_score, amap=amap)
        peak = np.unravel_index(int(np.argmax(grid)), grid.shape)
        results.append(ZeroShotResult(i, score, grid, amap, (int(peak[0]), int(peak[1]))))
    return results


def _tail_buffer(
    bank: _Bank, row_image: np.ndarray, row_patch: np.ndarray, k: int, plan: _Plan
) -> _TailBuffer:
    """The k smallest distances of a group of query rows to their banks, in a tail buffer.

    The bank of the group is split into the group's own query rows (symmetric tiles: one product
    serves both blocks, screened along rows and along columns) and the rest (all other bank rows:
    other images, masked patches), screened along rows only.
    """
    n = int(row_image.size)
    dim, dtype, device = bank.dim, bank.dtype, bank.device
    qb, bb = plan.query_block, plan.bank_block
    queries = torch.zeros(_round_up(n, _ALIGN) + _ALIGN, dim + 1, dtype=dtype, device=device)
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

    buffer = _TailBuffer(n, k, dtype, device)
    blocks = [(a, min(n, a + qb)) for a in range(0, n, qb)]
    block_runs = [[run for run in query_runs if run[0] < r1 and run[1] > r0] for r0, r1 in blocks]
    seen = [0] * len(blocks)
    height = _round_up(qb, _ALIGN)
    width_max = _round_up(max(qb, bb), _ALIGN)
    columns = torch.zeros(width_max, dim + 1, dtype=dtype, device=device)
    tile_buf = torch.empty(height * width_max, dtype=dtype, device=device)

    def product(r0: int, r1: int, nb: int) -> torch.Tensor:
        h, w = _round_up(r1 - r0, _ALIGN), _round_up(nb, _ALIGN)
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
        columns[: c1 - c0, dim] = -1.0 - _SHIFT
        for bi in [bj, *range(bj)]:
            r0, r1 = blocks[bi]
            tile = product(r0, r1, c1 - c0)
            for start, stop, _ in block_runs[bi]:  # Eq. 5: not against the own image
                lo_r, hi_r = max(start, r0), min(stop, r1)
                lo_c, hi_c = max(start, c0), min(stop, c1)
                if lo_r < hi_r and lo_c < hi_c:
                    tile[lo_r - r0 : hi_r - r0, lo_c - c0 : hi_c - c0] = -math.inf
            keys = tile.view(_key_dtype(dtype))
            _update(buffer, keys, 1, r0, r1 - r0, seen[bi])
            seen[bi] += c1 - c0
            if bi != bj:
                _update(buffer, keys, 0, c0, c1 - c0, seen[bj])
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
            _update(buffer, tile.view(_key_dtype(dtype)), 1, r0, r1 - r0, seen[bi])
            seen[bi] += b1 - b0
    return buffer
