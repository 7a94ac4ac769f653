"""The MVTec evaluation protocol: k-shot x seeds (or zero-shot) on one category, with metrics.

Arrays in, a table out: ``evaluate_category`` takes the decoded test split, a ready feature
extractor and a callable that decodes a reference image; listing and reading the category,
loading the backbone and writing the outputs is ``tasks/evaluation.py``.
"""

from __future__ import annotations

import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from .augment import AGNOSTIC_ANGLES, bank_angles, rotate_image
from .choices import Method
from .config import FoundADSettings, ModelSettings, Preprocess, ScoringSettings
from .datasets import INFORMED_SETTINGS, MVTecCategory, TestItem
from .features import PatchFeatureExtractor
from .few_shot import FewShotScorer
from .foundad.evaluation import Measure, train_and_score, unmeasured
from .foundad.features import embed_with_foundad
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
    methods: tuple[Method, ...] = ("knn",)  # knn and/or foundad, on the same features
    foundad: FoundADSettings = field(default_factory=FoundADSettings)


def parse_methods(text: str) -> tuple[Method, ...]:
    """'knn', 'foundad' or 'knn,foundad' (both on the same backbone pass)."""
    known = typing.get_args(Method)
    out = tuple(m.strip().lower() for m in str(text).split(",") if m.strip())
    bad = [m for m in out if m not in known]
    if bad or not out:
        raise ValueError(f"bad method {bad or text!r}: use {', '.join(known)} or a comma list")
    return tuple(dict.fromkeys(out))  # type: ignore[return-value]


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


class ProgressTracker(Protocol):
    """Counts units of work done (the CLI's bar, ``flows/progress.py``, is one)."""

    def update(self, n: int) -> None: ...

    def close(self) -> None: ...


#: start_progress(total, what) -> a tracker of ``total`` units
StartProgress = Callable[[int, str], ProgressTracker]


class LoggedProgress:
    """The default tracker: a ``log`` line at most every 5 s and at the end."""

    def __init__(self, log: Log, total: int, label: str) -> None:
        self.log, self.label, self.total = log, label, total
        self.done, self.t0, self.last = 0, time.perf_counter(), 0.0

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last > 5.0 or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            self.log(f"  {self.label}: {self.done}/{self.total} ({rate:.1f}/s)")

    def close(self) -> None:
        pass


def evaluate_category(
    request: EvaluationRequest,
    category: MVTecCategory,
    test: DecodedTestSplit,
    extractor: PatchFeatureExtractor,
    read_reference: Callable[[Path], np.ndarray],
    log: Log,
    measure: Measure = unmeasured,
    start_progress: StartProgress | None = None,
) -> pd.DataFrame:
    """Evaluate one category; returns one row per method x shots x seed with every metric.

    ``read_reference(path)`` decodes one of ``category.train_good`` (called once per reference
    a run uses); everything else arrives decoded in ``test``. FoundAD trains one projector per
    shots x seed (seeded by it) on the same references the kNN bank uses, with CutPaste on the
    foreground when the masking decision is on; ``measure`` reports its peak memory.
    """
    model, scoring = request.model, request.scoring
    masking_mode, rotate = preprocess_plan(request.preprocess, category.name, scoring.masking)
    backbone = extractor.backbone
    items, images, read_errors = test.items, test.images, test.errors
    if not items:
        raise ValueError(f"{category.name}: no readable test images")
    labels = np.array([it.label for it in items])
    gt_masks = test.masks

    start_progress = start_progress or (lambda total, what: LoggedProgress(log, total, what))
    progress = start_progress(len(images), "embedding test images")
    test_grids: list[np.ndarray] = []
    test_tokens: list[np.ndarray] = []  # FoundAD's layer, from the same pass
    with_foundad = "foundad" in request.methods
    t0 = time.perf_counter()
    step = max(1, extractor.batch_size)
    for start in range(0, len(images), step):
        if with_foundad:
            grids, tokens = embed_with_foundad(extractor, images[start : start + step])
            test_grids.extend(grids)
            test_tokens.extend(tokens)
        else:
            test_grids.extend(extractor.embed(images[start : start + step]))
        progress.update(min(step, len(images) - start))
    progress.close()
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
        "train_seconds": float("nan"),
        "train_epochs": 0,
        "stopped_by": "",
        "train_peak_rss_gb": float("nan"),
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
            common = dict(
                base,
                shots=label,
                seed=seed,
                masking=use_mask,
                masking_reason=decision_reason,
                masking_rule=MASKING_RULE,
            )
            if "knn" in request.methods or shots == 0:
                row = dict(common, method="knn", bank_patches=bank, score_ms_per_image=score_ms)
                rows.append(_scored(row, scores, labels, maps_iter, gt_masks, log))
            if with_foundad and shots != 0:
                run = train_and_score(
                    [ref_images[p] for p in refs],
                    [foreground_mask(ref_cache[(p, 0)], threshold=threshold) for p in refs]
                    if use_mask
                    else None,
                    test_tokens,
                    sizes,
                    extractor,
                    request.foundad.config(model, scoring, seed),
                    label=f"{label}-shot seed {seed}: ",
                    log=log,
                    measure=measure,
                )
                row = dict(
                    common,
                    method="foundad",
                    bank_patches=0,
                    score_ms_per_image=run.score_ms_per_image,
                    train_seconds=run.train_seconds,
                    train_epochs=run.train_epochs,
                    stopped_by=run.stopped_by,
                    train_peak_rss_gb=run.peak_rss_gb,
                )
                rows.append(_scored(row, run.scores, labels, run.maps, gt_masks, log))
    return pd.DataFrame(rows)


def _scored(row: dict, scores, labels, maps, gt_masks, log: Log) -> dict:
    # kNN maps are cosine distances in [0, 2]; FoundAD's squared errors are unbounded, so the
    # pixel metrics bin them over their own range (65,536 bins either way)
    if row["method"] == "knn":
        score_range = (0.0, 2.0)
    else:
        maps = list(maps)
        score_range = (0.0, max(float(np.nanmax(m)) for m in maps) * (1 + 1e-6) or 1.0)
    row.update(_metrics(scores, labels, maps, gt_masks, score_range))
    log(
        f"{row['shots']}-shot seed {row['seed']} {row['method']}: image AUROC "
        f"{row['image_auroc']:.4f}"
        + (f", AU-PRO {row['pixel_aupro']:.4f}" if gt_masks is not None else "")
        + (f", trained in {row['train_seconds']:.0f}s" if row["method"] == "foundad" else "")
    )
    return row


def _metrics(scores, labels, maps, gt_masks, score_range=(0.0, 2.0)) -> dict:
    out = {c: float("nan") for c in METRIC_COLUMNS}
    im = image_metrics(scores, labels)
    out.update(image_auroc=im.auroc, image_ap=im.ap, image_f1_max=im.f1_max)
    if gt_masks is not None:
        acc = PixelMetricAccumulator(score_range)
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
    if "method" not in df.columns:  # tables written before FoundAD
        df = df.assign(method="knn")
    for (cat, method), group in df.groupby(["category", "method"], sort=False):
        first = group.iloc[0]
        lines.append(
            f"### {cat} — {method}, {first['backbone']} @ {first['resolution']}px, "
            f"preprocess {first['preprocess']}, {first['precision']}"
        )
        lines.append("")
        cols = [c for c in METRIC_COLUMNS if group[c].notna().any()]
        trained = method == "foundad"
        header = ["shots", "seeds", *cols, "embed ms/img", "score ms/img"]
        header += ["train s", "train peak GiB"] if trained else []
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
            if trained:
                cells.append(f"{g['train_seconds'].mean():.0f}")
                cells.append(f"{g['train_peak_rss_gb'].max():.2f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
