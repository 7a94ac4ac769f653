"""Few-shot AnomalyDINO: a memory bank of reference patches, image scores and anomaly maps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .memory_bank import IndexKind, PatchIndex
from .nn_search import SearchMethod
from .scoring import MAP_SIGMA, anomaly_map, image_score


@dataclass(frozen=True)
class ScoreResult:
    """The outcome of scoring one image."""

    score: float
    patch_distances: np.ndarray  # (gh, gw) float32, masked patches 0
    anomaly_map: np.ndarray | None  # (H, W) float32 at the original image size
    foreground: np.ndarray | None  # (gh, gw) bool, None when masking is off
    max_patch: tuple[int, int]  # (row, col) of the most anomalous patch

    @property
    def masked_fraction(self) -> float:
        """Fraction of patches masked out as background."""
        return 0.0 if self.foreground is None else float(1.0 - self.foreground.mean())


class FewShotScorer:
    """Nearest-neighbour patch scoring against a bank of reference patches (METHOD.md s. 3).

    ``fit`` takes the reference grids (all views, e.g. rotations) and optional per-grid
    foreground masks (to mask the references too); ``score`` takes one test grid.
    ``search_method``: the CPU search of the flat indexes (``PatchIndex``; None: measured).
    Any grid shape: a search costs (query patches x bank patches), square or not.
    """

    def __init__(
        self,
        *,
        image_score_method: str = "top1p_mean",
        sigma: float = MAP_SIGMA,
        index_kind: IndexKind = "exact",
        use_gpu: bool | None = None,
        search_method: SearchMethod | None = None,
    ) -> None:
        self.image_score_method = image_score_method
        self.sigma = sigma
        self.index = PatchIndex(index_kind, use_gpu=use_gpu, search_method=search_method)

    @property
    def bank_size(self) -> int:
        return self.index.size

    def fit(
        self,
        reference_grids: Sequence[np.ndarray],
        reference_masks: Sequence[np.ndarray | None] | None = None,
    ) -> FewShotScorer:
        if not reference_grids:
            raise ValueError("few-shot scoring needs at least one reference image")
        rows = []
        for i, grid in enumerate(reference_grids):
            flat = grid.reshape(-1, grid.shape[-1])
            mask = None if reference_masks is None else reference_masks[i]
            if mask is not None and mask.any():
                flat = flat[mask.reshape(-1)]
            rows.append(flat)
        self.index.fit(np.concatenate(rows, axis=0))
        return self

    def score(
        self,
        grid: np.ndarray,
        *,
        image_size: tuple[int, int] | None = None,
        foreground: np.ndarray | None = None,
        with_map: bool = True,
    ) -> ScoreResult:
        """Score a (gh, gw, C) grid; masked-out patches get distance 0 and are not searched."""
        (patch,) = self.patch_distances([grid], [foreground])
        return self.result(patch, image_size=image_size, foreground=foreground, with_map=with_map)

    def patch_distances(
        self,
        grids: Sequence[np.ndarray],
        foregrounds: Sequence[np.ndarray | None] | None = None,
    ) -> list[np.ndarray]:
        """(gh, gw) distance grids of several images, searched in one bank query (masked-out
        patches: 0, not searched). The same distances as one ``score`` per image: on CPU to the
        bit (flat indexes recompute each distance as one dot product); on a GPU up to the last
        float bit (the products are blocked by query count)."""
        foregrounds = foregrounds or [None] * len(grids)
        queries, keeps = [], []
        for grid, fg in zip(grids, foregrounds, strict=True):
            flat = grid.reshape(-1, grid.shape[-1])
            keep = None if fg is None else np.asarray(fg, dtype=bool).reshape(-1)
            queries.append(flat if keep is None else flat[keep])
            keeps.append(keep)
        found = np.concatenate(queries) if queries else np.zeros((0, 1), np.float32)
        nearest = self.index.nearest_distance(found) if len(found) else found[:, 0]
        out, start = [], 0
        for grid, q, keep in zip(grids, queries, keeps, strict=True):
            distances = np.zeros(grid.shape[0] * grid.shape[1], dtype=np.float32)
            part = nearest[start : start + len(q)]
            start += len(q)
            if keep is None:
                distances[:] = part
            else:
                distances[keep] = part
            out.append(distances.reshape(grid.shape[:2]))
        return out

    def result(
        self,
        patch: np.ndarray,
        *,
        image_size: tuple[int, int] | None = None,
        foreground: np.ndarray | None = None,
        with_map: bool = True,
    ) -> ScoreResult:
        """Image score, anomaly map and peak of a (gh, gw) distance grid."""
        amap = None
        if with_map or self.image_score_method == "max_map":
            if image_size is None:
                raise ValueError("image_size is needed to build the anomaly map")
            amap = anomaly_map(patch, image_size, sigma=self.sigma)
        score = image_score(patch, self.image_score_method, amap=amap)
        row, col = divmod(int(np.argmax(patch)), patch.shape[1])
        return ScoreResult(
            score=score,
            patch_distances=patch,
            anomaly_map=amap,
            foreground=None if foreground is None else np.asarray(foreground, dtype=bool),
            max_patch=(row, col),
        )
