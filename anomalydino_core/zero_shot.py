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

Computation: ``anomalydino_core.mutual_topk`` streams the (queries x M) distances in tiles within
``memory_budget_bytes`` and keeps only the k smallest per query patch. The results equal a dense
computation up to the float rounding of the matmul and do not depend on the block sizes or on how
the queries are split over calls (``split_query_indices``). fp32 is the default; bf16 is about 5x
faster on CPUs with AVX512-BF16 or AMX, with image scores within 3e-4 relative of fp32 (measured;
see ``mutual_topk``).
"""

from __future__ import annotations

import functools
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from anomalydino_core.cpu import cpu_has_fast_bf16
from anomalydino_core.mutual_topk import (
    FeatureSource,
    Precision,
    Statistic,
    budget_side,
    tail_distances,
    tail_size,
)
from anomalydino_core.scoring import IMAGE_SCORE_METHODS, MAP_SIGMA, anomaly_map, image_score

if TYPE_CHECKING:
    from anomalydino_core.config import ScoringSettings

#: Default lower-tail fraction alpha (0.1 %).
DEFAULT_ALPHA = 0.001


@dataclass(frozen=True)
class MutualScoringConfig:
    """Settings of batched zero-shot scoring.

    ``query_block_rows`` / ``bank_block_rows`` override the block sizes (for tests and tuning);
    the results do not depend on them beyond float rounding. Without them, on CPU, the tile side
    is measured once per process (``tuned_tile``), within what the budget allows, when
    ``tune_tiles`` is True, or None and the batch has ``TUNE_MIN`` patches or more.
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
    tune_tiles: bool | None = None

    def __post_init__(self) -> None:
        if self.statistic not in typing.get_args(Statistic):
            raise ValueError(f"unknown statistic {self.statistic!r}")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
        if self.precision not in typing.get_args(Precision):
            raise ValueError(f"unknown precision {self.precision!r}")
        if self.image_score not in IMAGE_SCORE_METHODS:
            raise ValueError(f"unknown image score {self.image_score!r}")
        if self.memory_budget_bytes <= 0:
            raise ValueError("memory_budget_bytes must be positive")
        for name in ("query_block_rows", "bank_block_rows"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1")

    @classmethod
    def from_settings(
        cls, scoring: ScoringSettings, *, device: str = "auto"
    ) -> MutualScoringConfig:
        """The zero-shot part of the scoring settings: statistic, alpha, memory budget (GiB),
        image score and map sigma; precision fp32.

        ``device`` is not a scoring setting: the evaluation scores on "auto" (CUDA when there is
        one), the screening flow on "cpu" when the model is configured for the CPU.
        """
        return cls(
            statistic=scoring.zero_shot_statistic,
            alpha=scoring.zero_shot_alpha,
            memory_budget_bytes=int(scoring.memory_budget_gb * 2**30),
            image_score=scoring.image_score,
            sigma=scoring.sigma,
            device=device,
        )


@dataclass(frozen=True)
class ZeroShotResult:
    """Scores of one query image; ``patch_scores`` and ``anomaly_map`` are float32."""

    index: int
    score: float
    patch_scores: np.ndarray  # (gh, gw)
    anomaly_map: np.ndarray | None  # (H, W), None without image sizes
    max_patch: tuple[int, int]  # (row, col) of the largest patch score


@dataclass(frozen=True)
class ArrayFeatureSource:
    """A FeatureSource (``mutual_topk.FeatureSource``) over grids already in memory."""

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


def split_query_indices(n_images: int, n_parts: int) -> list[list[int]]:
    """Contiguous, nearly equal query subsets for independent tasks (empty parts dropped)."""
    bounds = np.linspace(0, n_images, max(1, n_parts) + 1).round().astype(int)
    return [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def score_mutual(
    features: Sequence[np.ndarray] | FeatureSource,
    *,
    query_indices: Sequence[int] | None = None,
    masks: Sequence[np.ndarray | None] | None = None,
    image_sizes: Sequence[tuple[int, int]] | None = None,
    config: MutualScoringConfig | None = None,
) -> list[ZeroShotResult]:
    """Score ``query_indices`` (default: all images) against the whole batch (Eq. 5-7).

    Shapes, for N images, image i with a (gh_i, gw_i) patch grid of C channels:

    - ``features``: N (gh_i, gw_i, C) float16/float32 grids, or a FeatureSource (read lazily).
    - ``masks``: N (gh_i, gw_i) bool foreground masks or None (indexed like ``features``; only
      the queries' are used). ``image_sizes``: N (H_i, W_i), for anomaly maps (none without).
    - returns one ZeroShotResult per query, in query order: ``patch_scores`` (gh_i, gw_i),
      ``anomaly_map`` (H_i, W_i) or None, ``score`` from the patch scores (``image_score``).

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

    # k per query image: its bank M_j is every patch of the other images
    shapes = [source.grid_shape(i) for i in range(n_images)]
    total = sum(gh * gw for gh, gw in shapes)
    ks = {
        i: tail_size(config.statistic, config.alpha, total - shapes[i][0] * shapes[i][1])
        for i in queries
    }

    dim = int(source.load(next(iter(queries))).shape[2])  # C
    precision = config.precision
    query_block, bank_block = config.query_block_rows, config.bank_block_rows
    tune = config.tune_tiles if config.tune_tiles is not None else total >= TUNE_MIN
    if query_block is None and bank_block is None and tune and _on_cpu(config.device):
        k = max(ks.values())
        side = budget_side(precision, config.memory_budget_bytes, k)
        precision, query_block = tuned_tile(precision, dim, k, total, side)
        bank_block = query_block

    # fg[i]: (F_i,) flat foreground patch indices of query i; R = sum F_i query rows
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
    row_image = np.concatenate([np.full(fg[i].size, i, dtype=np.int64) for i in queries])  # (R,)
    row_patch = np.concatenate([fg[i] for i in queries]).astype(np.int64)  # (R,)

    # (R,) float32: per query row, the tail statistic of its distances to M_j
    distances = tail_distances(
        source,
        row_image,
        row_patch,
        ks,
        dim=dim,
        statistic=config.statistic,
        precision=precision,
        device=config.device,
        memory_budget_bytes=config.memory_budget_bytes,
        query_block_rows=query_block,
        bank_block_rows=bank_block,
    )

    results: list[ZeroShotResult] = []
    pos = 0
    for i in queries:
        gh, gw = shapes[i]
        grid = np.zeros(gh * gw, dtype=np.float32)  # masked-out patches: distance 0
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


# ------------------------------------------------------------------- measured tiles (CPU)

#: Square tile sides tried on CPU. AMD EPYC (avx512_bf16, 2 threads, N = 83 x 1024 patches,
#: bf16, 16 queries, shared machine): 4096 1.7-3.0 s/img, 2048 3.0-4.0, 1024 4.8-5.9 (fewer,
#: larger products and screening passes); a CPU whose caches favour smaller tiles picks 2048.
TILE_SIDES = (2048, 4096)
#: Smaller batches keep the budget's side: the probe (0.1-0.5 s) would cost more than it saves.
TUNE_MIN = 32768
#: Another option must beat the budget's side by this factor (noise on a shared machine: two
#: interleaved N = 83 runs here picked 4096 and 2048 in turn without the margin).
MARGIN = 0.9


def _on_cpu(device: str) -> bool:
    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


def _steady_tile_seconds(side: int, precision: Precision, dim: int, k: int, seen: int) -> float:
    """Seconds per tile element in the steady state, best of 2: the product of a side x side tile
    and its screening into a tail buffer of ``k`` whose thresholds are set (to distance 0.05,
    as after ``seen`` bank columns: few values pass, as in the bulk of a real search)."""
    from anomalydino_core.mutual_topk_kernels import SHIFT, TailBuffer, key_dtype, update

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(0)
    offset = torch.randn(dim, generator=gen)  # a shared component: distances cluster

    def rows(constant: float) -> torch.Tensor:
        x = torch.nn.functional.normalize(offset + torch.randn(side, dim, generator=gen), dim=1)
        return torch.cat([x, torch.full((side, 1), constant)], dim=1).to(dtype)

    queries, columns = rows(1.0), rows(-1.0 - SHIFT)
    buffer = TailBuffer(side, k, dtype, torch.device("cpu"))
    buffer.thr.fill_(int(torch.tensor(-0.05 - SHIFT, dtype=dtype).view(key_dtype(dtype))))
    buffer.count.fill_(k)
    tile = torch.empty(side, side, dtype=dtype)
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        torch.mm(queries, columns.t(), out=tile)
        update(buffer, tile.view(key_dtype(dtype)), 1, 0, side, seen)
        best = min(best, time.perf_counter() - t0)
    return best / side**2


@functools.cache
def _measure_tile(
    precision: Precision, dim: int, k: int, bank: int, max_side: int, threads: int
) -> tuple[Precision, int]:
    del threads  # cache key only
    sides = [s for s in TILE_SIDES if s <= max_side] or [max_side]
    options: list[tuple[Precision, int]] = [(precision, s) for s in sides]
    if precision == "bf16" and not cpu_has_fast_bf16():
        options.append(("fp32", sides[-1]))  # bf16 emulated: fp32 may be faster (and exact)
    if len(options) == 1:
        return options[0]
    with torch.inference_mode():
        cost = {opt: _steady_tile_seconds(opt[1], opt[0], dim, k, bank // 2) for opt in options}
    default = (precision, sides[-1])
    best = min(cost, key=cost.__getitem__)
    return best if cost[best] < MARGIN * cost[default] else default


def tuned_tile(
    precision: Precision, dim: int, k: int, bank: int, max_side: int
) -> tuple[Precision, int]:
    """(precision, square tile side) for CPU scoring of a bank of ``bank`` patches with tail
    ``k``: the fastest of ``TILE_SIDES`` up to the budget's ``max_side`` per tile element in the
    steady state (``_steady_tile_seconds``; 0.1-0.4 s), measured once per process, precision,
    width, k, bank size class and thread count. ``bf16`` on a CPU without native bf16 also tries
    fp32 (exact, so within every bf16 tolerance)."""
    bank_class = 1 << max(1, bank - 1).bit_length()  # the cache key: the next power of two
    return _measure_tile(precision, dim, k, bank_class, max_side, torch.get_num_threads())
