"""The MVTec evaluation protocol: k-shot x seeds (or zero-shot) on one category, with metrics.

Arrays in, a table out: ``evaluate_category`` takes the decoded test split, a ready feature
extractor and a callable that decodes a reference image; listing and reading the category,
loading the backbone and writing the outputs is ``tasks/evaluation.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .augment import AGNOSTIC_ANGLES, bank_angles, rotate_image
from .config import ModelSettings, Preprocess, ScoringSettings
from .datasets import INFORMED_SETTINGS, MVTecCategory, TestItem
from .features import PatchFeatureExtractor
from .few_shot import FewShotScorer
from .masking import (
    MASKING_RULE,
    TESTED_REFERENCES,
    TESTED_SCREENING_IMAGES,
    decide_masking,
    foreground_mask,
    views_of_references,
)
from .metrics import PixelMetricAccumulator, image_metrics

Log = Callable[[str], None]

METRIC_COLUMNS = (
    "image_auroc", "image_ap", "image_f1_max",
    "pixel_auroc", "pixel_f1_max", "pixel_aupro", "pixel_ap",
)  # fmt: skip


@dataclass(frozen=True)
class EvaluationRequest:
    data: Path
    category: str
    shots: tuple[int | None, ...]  # None = full-shot, 0 = batched zero-shot
    seeds: tuple[int, ...] = (0, 1, 2)
    preprocess: Preprocess = "agnostic"
    model: ModelSettings = field(default_factory=ModelSettings)
    scoring: ScoringSettings = field(default_factory=ScoringSettings)


def parse_shots(text: str) -> tuple[int | None, ...]:
    """'1,2,4,8,16|full' style lists; 'full' -> None, '0' -> zero-shot."""
    out: list[int | None] = []
    for part in str(text).replace("|", ",").split(","):
        part = part.strip().lower()
        if not part:
            continue
        if part == "full":
            out.append(None)
        elif part.isdigit():
            out.append(int(part))
        else:
            raise ValueError(f"bad shots value {part!r}: use integers >= 0 or 'full'")
    if not out:
        raise ValueError("no shots given")
    return tuple(out)


@dataclass
class DecodedTestSplit:
    """A category's readable test images, in order, with their items and ground-truth masks."""

    items: list[TestItem]
    images: list[np.ndarray]  # RGB uint8
    masks: list[np.ndarray] | None  # bool, one per image (all False for good ones); None: none
    errors: list[str]  # one message per unreadable test file


def preprocess_plan(preprocess: Preprocess, category: str, masking: str) -> tuple[str, bool]:
    """(masking mode, rotate references) for a preprocessing scheme."""
    if preprocess == "agnostic":
        return masking, True
    if preprocess == "masking_only":
        return masking, False
    if preprocess == "none":
        return "off", False
    if preprocess == "informed":
        if category not in INFORMED_SETTINGS:
            raise ValueError(
                f"no informed preprocessing known for {category!r}; known: "
                f"{', '.join(sorted(INFORMED_SETTINGS))}; use agnostic or masking_only"
            )
        return INFORMED_SETTINGS[category]
    raise ValueError(f"unknown preprocess {preprocess!r}")


class _Progress:
    def __init__(self, log: Log, label: str, total: int) -> None:
        self.log, self.label, self.total = log, label, total
        self.done, self.t0, self.last = 0, time.perf_counter(), 0.0

    def step(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last > 5.0 or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            self.log(f"  {self.label}: {self.done}/{self.total} ({rate:.1f}/s)")


def evaluate_category(
    request: EvaluationRequest,
    category: MVTecCategory,
    test: DecodedTestSplit,
    extractor: PatchFeatureExtractor,
    read_reference: Callable[[Path], np.ndarray],
    log: Log,
) -> pd.DataFrame:
    """Evaluate one category; returns one row per shots x seed with every metric.

    ``read_reference(path)`` decodes one of ``category.train_good`` (called once per reference
    a run uses); everything else arrives decoded in ``test``.
    """
    model, scoring = request.model, request.scoring
    masking_mode, rotate = preprocess_plan(request.preprocess, category.name, scoring.masking)
    backbone = extractor.backbone
    items, images, read_errors = test.items, test.images, test.errors
    if not items:
        raise ValueError(f"{category.name}: no readable test images")
    labels = np.array([it.label for it in items])
    gt_masks = test.masks

    progress = _Progress(log, "embedding test images", len(images))
    test_grids: list[np.ndarray] = []
    t0 = time.perf_counter()
    step = max(1, extractor.batch_size)
    for start in range(0, len(images), step):
        test_grids.extend(extractor.embed(images[start : start + step]))
        progress.step(min(step, len(images) - start))
    embed_ms = 1000.0 * (time.perf_counter() - t0) / len(images)
    threshold = backbone.spec.mask_threshold
    test_fg = [foreground_mask(g, threshold=threshold) for g in test_grids]
    sizes = [img.shape[:2] for img in images]

    ref_cache: dict[tuple[Path, int], np.ndarray] = {}
    ref_images: dict[Path, np.ndarray] = {}

    def reference_grids(paths: list[Path], angles: tuple[int, ...]) -> list[np.ndarray]:
        missing = [(p, a) for p in paths for a in angles if (p, a) not in ref_cache]
        views = []
        for p, a in missing:
            if p not in ref_images:
                ref_images[p] = read_reference(p)
            views.append(rotate_image(ref_images[p], a))
        for (p, a), grid in zip(missing, extractor.embed(views), strict=True):
            ref_cache[(p, a)] = grid
        return [ref_cache[(p, a)] for p in paths for a in angles]

    base = {
        "category": category.name,
        "backbone": backbone.identity.name,
        "weights_sha256": backbone.identity.weights_sha256,
        "resolution": model.resolution,
        "precision": extractor.precision,
        "preprocess": request.preprocess,
        "image_score": scoring.image_score,
        "n_test_images": len(items),
        "n_unreadable": len(read_errors),
        "embed_ms_per_image": embed_ms,
    }
    rows = []
    for shots in request.shots:
        seeds = (0,) if shots in (None, 0) else request.seeds
        for seed in seeds:
            label = "full" if shots is None else str(shots)
            if shots == 0:
                result = _zero_shot(test_grids, test_fg, sizes, masking_mode, threshold, scoring)
                decision_reason, use_mask, bank = result[2], result[3], 0
                scores, maps_iter, score_ms = result[0], result[1], result[4]
            else:
                refs = category.references(shots, seed)
                angles = AGNOSTIC_ANGLES if (rotate and shots is not None) else (0,)
                t_ref = time.perf_counter()
                reference_grids(refs, angles)
                grids = [  # non-square references: 0 and 180 degrees only (bank_angles)
                    ref_cache[(p, a)]
                    for p in refs
                    for a in bank_angles(ref_images[p].shape[:2], angles)[0]
                ]
                tested = refs[:TESTED_REFERENCES]
                reference_grids(tested, AGNOSTIC_ANGLES)  # the test's views, embedded once
                views = views_of_references(
                    [[ref_cache[(p, a)] for a in AGNOSTIC_ANGLES] for p in tested],
                    AGNOSTIC_ANGLES,
                    [p.name for p in tested],
                )
                decision = decide_masking(masking_mode, views, threshold=threshold)
                use_mask = decision.use_mask
                decision_reason = decision.reason
                ref_masks = None
                if use_mask and scoring.mask_references:
                    ref_masks = [foreground_mask(g, threshold=threshold) for g in grids]
                scorer = FewShotScorer(
                    image_score_method=scoring.image_score,
                    sigma=scoring.sigma,
                    index_kind=scoring.index,
                ).fit(grids, ref_masks)
                bank = scorer.bank_size
                log(
                    f"{label}-shot seed {seed}: bank of {bank} patches from {len(refs)} references "
                    f"x {len(angles)} views ({time.perf_counter() - t_ref:.1f}s); "
                    f"masking {'on' if use_mask else 'off'} ({decision_reason})"
                )
                t1 = time.perf_counter()
                results = [
                    scorer.score(g, image_size=s, foreground=fg if use_mask else None)
                    for g, s, fg in zip(test_grids, sizes, test_fg, strict=True)
                ]
                score_ms = 1000.0 * (time.perf_counter() - t1) / len(items)
                scores = np.array([r.score for r in results])
                maps_iter = [r.anomaly_map for r in results]
            row = dict(
                base,
                shots=label,
                seed=seed,
                bank_patches=bank,
                masking=use_mask,
                masking_reason=decision_reason,
                masking_rule=MASKING_RULE,
                score_ms_per_image=score_ms,
            )
            row.update(_metrics(scores, labels, maps_iter, gt_masks))
            rows.append(row)
            log(
                f"{label}-shot seed {seed}: image AUROC {row['image_auroc']:.4f}"
                + (f", AU-PRO {row['pixel_aupro']:.4f}" if gt_masks is not None else "")
            )
    return pd.DataFrame(rows)


def _metrics(scores, labels, maps, gt_masks) -> dict:
    out = {c: float("nan") for c in METRIC_COLUMNS}
    im = image_metrics(scores, labels)
    out.update(image_auroc=im.auroc, image_ap=im.ap, image_f1_max=im.f1_max)
    if gt_masks is not None:
        acc = PixelMetricAccumulator()
        for amap, gt in zip(maps, gt_masks, strict=True):
            acc.add(amap, gt)
        pm = acc.compute()
        out.update(
            pixel_auroc=pm.auroc, pixel_f1_max=pm.f1_max, pixel_aupro=pm.aupro, pixel_ap=pm.ap
        )
    return out


def _zero_shot(grids, fgs, sizes, masking_mode, threshold, scoring: ScoringSettings):
    from .zero_shot import MutualScoringConfig, score_mutual

    if masking_mode == "off":
        use_mask, reason = False, "masking off"
    else:
        views = [(f"test image {i}", g) for i, g in enumerate(grids[:TESTED_SCREENING_IMAGES])]
        decision = decide_masking(masking_mode, views, threshold=threshold)
        use_mask, reason = decision.use_mask, decision.reason
    config = MutualScoringConfig.from_settings(scoring)  # device "auto"
    t0 = time.perf_counter()
    results = score_mutual(grids, masks=fgs if use_mask else None, image_sizes=sizes, config=config)
    score_ms = 1000.0 * (time.perf_counter() - t0) / len(grids)
    scores = np.array([r.score for r in results])
    return scores, [r.anomaly_map for r in results], reason, use_mask, score_ms


def summary_table(df: pd.DataFrame) -> str:
    """Markdown: mean +- std over seeds per shots, in %, like the paper's per-category tables."""
    lines = []
    for cat, group in df.groupby("category", sort=False):
        first = group.iloc[0]
        lines.append(
            f"### {cat} — {first['backbone']} @ {first['resolution']}px, "
            f"preprocess {first['preprocess']}, {first['precision']}"
        )
        lines.append("")
        cols = [c for c in METRIC_COLUMNS if group[c].notna().any()]
        header = ["shots", "seeds", *cols, "embed ms/img", "score ms/img"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for shots, g in group.groupby("shots", sort=False):
            cells = [str(shots), str(len(g))]
            for c in cols:
                vals = 100.0 * g[c].to_numpy(dtype=float)
                std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
                cells.append(f"{vals.mean():.1f} ± {std:.1f}")
            cells.append(f"{g['embed_ms_per_image'].mean():.1f}")
            cells.append(f"{g['score_ms_per_image'].mean():.1f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
