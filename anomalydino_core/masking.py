"""Zero-shot foreground masking from the first PCA component, and the automatic masking test.

The masking test decides once per product whether test images are masked (METHOD.md s. 2). A
masked patch scores 0, so a wrong "on" hides every defect in the "background" half of a texture,
where a wrong "off" costs an object product about 1-2 AUROC points: the test is conservative. It
looks at several views (up to ``TESTED_REFERENCES`` references, each in its 8 rotations) and
says "on" only when every view shows one framed object on a plain background and the views'
masks agree in size; when unsure, off.

What separates "object on a plain background" from a texture, measured with EfficientNet-Lite0
on one good image of each MVTec AD category in 13 views (8 rotations, central and corner crops):
the PCA split of a texture is two halves of the same texture, equally spread in feature space
(foreground / background spread ratio 0.5-1.2 for carpet, grid, leather, tile, wood), while a
plain background is a tight cluster beside a varied object (ratio 2.4-4.9 for capsule, hazelnut,
pill, screw, toothbrush). The area, border and centre checks alone (rule 1) passed textures by
thin margins and flipped under rotations and crops.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np
import scipy.linalg
import scipy.sparse.linalg
from scipy import ndimage

from .choices import MaskingMode

_SQUARE = np.ones((3, 3), dtype=bool)

#: Identifies the decision rule; stored with every decision (and in bank keys, so banks decided
#: by an older rule are rebuilt rather than reused).
MASKING_RULE = "masking-test/2"
#: References the test looks at (the first ones of the sorted reference set), each in 8 rotations.
TESTED_REFERENCES = 4
#: Images a zero-shot screening tests (no references there; the images are not rotated).
TESTED_SCREENING_IMAGES = 8


MASKING_MODES: tuple[str, ...] = typing.get_args(MaskingMode)


def _top_eigenvector(covariance: np.ndarray) -> np.ndarray:
    """Unit eigenvector of the largest eigenvalue of a symmetric PSD matrix."""
    dim = covariance.shape[0]
    if dim > 2:
        try:
            _, vectors = scipy.sparse.linalg.eigsh(
                covariance, k=1, which="LA", tol=0, v0=np.ones(dim)
            )
            return vectors[:, 0]
        except scipy.sparse.linalg.ArpackError:
            pass
    _, vectors = scipy.linalg.eigh(covariance, subset_by_index=[dim - 1, dim - 1], driver="evr")
    return vectors[:, -1]


def first_principal_component(features: np.ndarray) -> np.ndarray:
    """Projection of each patch onto the first principal component (deterministic sign).

    Top eigenvector of the C x C covariance of the centred (n, C) patch matrix (the same
    component as an SVD, several times faster for n >> C), by ARPACK's Lanczos iteration to
    machine precision from a fixed start (deterministic). Intel Xeon (AMX), one thread, 1024 x
    384: 0.8-2.8 ms against 3.8-6.5 for LAPACK's MRRR driver computing only that pair (19 for a
    full ``eigh``), projections equal within 1e-12; MRRR remains the fallback (tiny C, or no
    convergence). The sign is fixed so that the loading with the largest absolute value is
    positive (sklearn's ``svd_flip``).
    """
    x = np.asarray(features, dtype=np.float64).reshape(-1, features.shape[-1])
    x = x - x.mean(axis=0, keepdims=True)
    component = _top_eigenvector(x.T @ x)
    if component[np.argmax(np.abs(component))] < 0:
        component = -component
    return x @ component


def foreground_mask(
    features: np.ndarray,
    *,
    threshold: float = 10.0,
    border: float = 0.2,
    min_center_fraction: float = 0.35,
) -> np.ndarray:
    """Foreground (gh, gw) bool mask of one image from its own patch features (METHOD.md s. 2).

    Foreground = first PCA component > ``threshold``; if ``min_center_fraction`` or less of the
    central window (``border`` cut on each side) is foreground, the sign is flipped. Then a 3x3
    dilation and a 3x3 closing.
    """
    grid_h, grid_w = features.shape[:2]
    pc = first_principal_component(features).reshape(grid_h, grid_w)
    mask = pc > threshold
    top, left = int(grid_h * border), int(grid_w * border)
    centre = mask[top : grid_h - top, left : grid_w - left]
    if centre.size and centre.sum() <= min_center_fraction * centre.size:
        mask = -pc > threshold
    mask = ndimage.binary_dilation(mask, structure=_SQUARE)
    # Closing = dilation then erosion; the erosion treats outside the image as foreground so a
    # closing never eats the object where it touches the image edge.
    closed = ndimage.binary_dilation(mask, structure=_SQUARE)
    return ndimage.binary_erosion(closed, structure=_SQUARE, border_value=1)


def feature_spread(vectors: np.ndarray) -> float:
    """1 - length of the mean of the L2-normalised (n, C) vectors: 0 when all point the same way,
    towards 1 when they are spread (the circular variance of directional statistics). NaN for
    fewer than 2 vectors."""
    if len(vectors) < 2:
        return float("nan")
    x = np.asarray(vectors, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return float(1.0 - np.linalg.norm(x.mean(axis=0)))


@dataclass(frozen=True)
class MaskingCriteria:
    """What one view must show to count as "one framed object on a plain background".

    Margins on the MVTec views (EfficientNet-Lite0): the five masked objects have spread ratio
    >= 2.4, centre >= 0.66, one component >= 0.91 of the mask, and border <= 0.28 in their 8
    rotations (<= 0.41 when a reference already rotated by 45 degrees is rotated again: the
    reflected corners add object); textures have spread ratio <= 1.2 wherever their mask leaves
    a background at all, and most also fail the foreground and border checks.
    """

    min_foreground: float = 0.05
    max_foreground: float = 0.85  # a close-up or a texture leaves little background
    min_centre: float = 0.5  # objects are framed by the camera
    max_border: float = 0.5  # the background owns at least half of the outermost patch ring
    min_largest_share: float = 0.9  # one object, not scattered blobs
    min_spread_ratio: float = 2.0  # foreground spread / background spread: a plain background
    max_foreground_range: float = 0.15  # views agree: max - min foreground fraction
    min_views: int = 2  # one view is not evidence enough


DEFAULT_CRITERIA = MaskingCriteria()


@dataclass(frozen=True)
class ViewEvidence:
    """The masking test's measurements on one view (a reference in one rotation, or an image)."""

    view: str
    foreground_fraction: float
    centre_fraction: float
    border_fraction: float
    largest_component_share: float
    n_components: int
    foreground_spread: float
    background_spread: float
    failed: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.failed


def view_evidence(
    features: np.ndarray,
    mask: np.ndarray,
    *,
    view: str = "",
    criteria: MaskingCriteria = DEFAULT_CRITERIA,
) -> ViewEvidence:
    """Measure one view's (gh, gw) foreground ``mask`` against its (gh, gw, C) ``features``."""
    mask = np.asarray(mask, dtype=bool)
    grid_h, grid_w = mask.shape
    flat = np.asarray(features).reshape(grid_h * grid_w, -1)
    fg = float(mask.mean())
    top, left = int(grid_h * 0.2), int(grid_w * 0.2)
    centre = mask[top : grid_h - top, left : grid_w - left]
    centre_fraction = float(centre.mean()) if centre.size else 0.0
    ring = np.concatenate([mask[0], mask[-1], mask[1:-1, 0], mask[1:-1, -1]])
    n_labels, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    sizes = np.bincount(labels.ravel())[1:] if n_labels > 1 else np.array([0])
    largest = float(sizes.max() / max(1, mask.sum()))
    fg_spread = feature_spread(flat[mask.reshape(-1)])
    bg_spread = feature_spread(flat[~mask.reshape(-1)])
    c = criteria
    ratio = fg_spread / bg_spread if bg_spread > 0 else float("nan")
    checks = [
        (fg >= c.min_foreground, f"foreground {fg:.2f} < {c.min_foreground}"),
        (fg <= c.max_foreground, f"foreground {fg:.2f} > {c.max_foreground} (close-up or texture)"),
        (centre_fraction >= c.min_centre, f"centre covered {centre_fraction:.2f} < {c.min_centre}"),
        (
            float(ring.mean()) <= c.max_border,
            f"mask covers {ring.mean():.2f} of the border > {c.max_border}",
        ),
        (largest >= c.min_largest_share, f"largest part {largest:.2f} < {c.min_largest_share}"),
        (
            bool(ratio >= c.min_spread_ratio),
            f"background not plain (spread ratio {ratio:.2f} < {c.min_spread_ratio})",
        ),
    ]
    return ViewEvidence(
        view=view,
        foreground_fraction=fg,
        centre_fraction=centre_fraction,
        border_fraction=float(ring.mean()),
        largest_component_share=largest,
        n_components=int(n_labels - 1),
        foreground_spread=fg_spread,
        background_spread=bg_spread,
        failed=tuple(msg for ok, msg in checks if not ok),
    )


def masking_test(
    views: Sequence[ViewEvidence], criteria: MaskingCriteria = DEFAULT_CRITERIA
) -> tuple[bool, str]:
    """(mask?, why) over every tested view: on only if each view passes and their masks agree."""
    if len(views) < criteria.min_views:
        return False, f"{len(views)} view(s) tested, at least {criteria.min_views} needed"
    failing = [v for v in views if not v.passed]
    if failing:
        first = failing[0]
        return False, (
            f"{len(failing)} of {len(views)} views do not show one framed object on a plain "
            f"background (e.g. {first.view}: {'; '.join(first.failed)})"
        )
    fractions = [v.foreground_fraction for v in views]
    spread = max(fractions) - min(fractions)
    if spread > criteria.max_foreground_range:
        return False, (
            f"masks disagree between views: foreground {min(fractions):.2f}-{max(fractions):.2f} "
            f"(range > {criteria.max_foreground_range})"
        )
    return True, f"all {len(views)} views show one framed object on a plain background"


@dataclass(frozen=True)
class MaskingDecision:
    """Whether a product's test images are masked, why, and the evidence per tested view."""

    use_mask: bool
    reason: str
    mode: str = "auto"
    test_passed: bool = False
    rule: str = MASKING_RULE
    views: tuple[ViewEvidence, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["views"] = [dict(asdict(v), failed=list(v.failed)) for v in self.views]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> MaskingDecision:
        views = tuple(
            ViewEvidence(**dict(v, failed=tuple(v.get("failed", ())))) for v in d.get("views", ())
        )
        keep = {k: d[k] for k in ("use_mask", "reason", "mode", "test_passed", "rule") if k in d}
        keep.setdefault("rule", "masking-test/1" if "views" not in d else MASKING_RULE)
        return cls(**keep, views=views)

    def explain(self) -> str:
        """Several lines for a person: the decision, the rule, and each view's measurements."""
        lines = [
            f"masking {'on' if self.use_mask else 'off'} ({self.mode}): {self.reason}",
            f"rule {self.rule}; {len(self.views)} view(s) tested",
        ]
        for v in self.views:
            lines.append(
                f"  {'pass' if v.passed else 'FAIL'} {v.view}: foreground {v.foreground_fraction:.2f}"
                f", centre {v.centre_fraction:.2f}, border {v.border_fraction:.2f}, largest part "
                f"{v.largest_component_share:.2f}, spread fg/bg {v.foreground_spread:.3f}/"
                f"{v.background_spread:.3f}" + (f" -- {'; '.join(v.failed)}" if v.failed else "")
            )
        return "\n".join(lines)


def decide_masking(
    mode: MaskingMode,
    views: Sequence[tuple[str, np.ndarray]],
    *,
    threshold: float,
    criteria: MaskingCriteria = DEFAULT_CRITERIA,
) -> MaskingDecision:
    """Resolve ``masking: auto|on|off`` with the test on named (gh, gw, C) grids.

    ``views`` are the tested references in their rotations (``TESTED_REFERENCES`` x 8), or the
    first images of a screening. ``on``/``off`` force the outcome; the test still runs and its
    verdict is recorded.
    """
    if mode not in MASKING_MODES:
        raise ValueError(f"masking must be one of {', '.join(MASKING_MODES)}, not {mode!r}")
    evidence = tuple(
        view_evidence(
            grid, foreground_mask(grid, threshold=threshold), view=name, criteria=criteria
        )
        for name, grid in views
    )
    passed, why = masking_test(evidence, criteria)
    if mode == "auto":
        return MaskingDecision(passed, why, mode, passed, MASKING_RULE, evidence)
    verdict = "on" if passed else "off"
    return MaskingDecision(
        mode == "on",
        f"masking forced {mode} by config (the test says {verdict}: {why})",
        mode,
        passed,
        MASKING_RULE,
        evidence,
    )


def views_of_references(
    grids_by_reference: Sequence[Sequence[np.ndarray]],
    angles: Sequence[int],
    names: Sequence[str] | None = None,
) -> list[tuple[str, np.ndarray]]:
    """Named views of the tested references: ``grids_by_reference[r][i]`` is reference r rotated
    by ``angles[i]``; only the first ``TESTED_REFERENCES`` references are taken."""
    out = []
    for r, grids in enumerate(grids_by_reference[:TESTED_REFERENCES]):
        name = names[r] if names is not None else f"reference {r}"
        out += [(f"{name} rot{a:03d}", g) for a, g in zip(angles, grids, strict=True)]
    return out
