"""A static HTML page per run, for the inspector: ``reports/<product>/<lot>/<run_id>.html`` next
to the Parquet report, with its images in ``<run_id>_files/``.

The page (``templates/lot_report.html.j2``) shows the run's summary, the lot's score
distribution against the threshold (inline SVG), one card per flagged image (a thumbnail, its
overlay on the lot's one colour scale with the colour bar of that scale, its score and the most
anomalous location), every image in a table sorted by score (sortable and filterable with a
small inline script, readable without it), the errors, and for a re-evaluation the verdicts that
changed. Links are relative and stay inside the run's files: the folder works as it is, on a
local disk or copied down from object storage. No network, no server.

Images are written first and the HTML last (atomically), so a page that exists is complete.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import cv2
import numpy as np
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from anomalydino_core.images import DECODE_MAX_PIXELS, decode_image
from anomalydino_core.overlays import overlay_scale, render_overlay
from tasks.lot_report_data import (
    Previous,
    fmt_score,
    histogram,
    previous_run,
    reference_images,
    report_rows,
    summary_facts,
)
from tasks.report import read_report, report_metadata
from tasks.storage import StorageConfig, atomic_write_bytes, read_bytes
from tasks.thumbnails import (
    THUMB_EDGE,
    decode_jpeg,
    fit,
    fit_map,
    jpeg,
    overlay_thumb_uri,
    thumb_uri,
)

TEMPLATES = Path(__file__).parent / "templates"
REF_EDGE = 160
MAX_CARDS = 200  # flagged images with a card; the table lists every image
MAX_REFERENCES = 24


def html_uri_of(report_uri: str) -> str:
    """``.../<run_id>.parquet`` -> ``.../<run_id>.html``."""
    return re.sub(r"\.parquet$", "", report_uri) + ".html"


def files_uri_of(report_uri: str) -> str:
    """The folder of the page's images: ``.../<run_id>_files``."""
    return re.sub(r"\.parquet$", "", report_uri) + "_files"


def _file_key(image_id: str) -> str:
    """A safe, unique, readable file name stem for an image id."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", image_id).strip("._")[-60:] or "image"
    return f"{slug}-{hashlib.sha256(image_id.encode()).hexdigest()[:10]}"


def jet_colours(n: int = 9) -> list[str]:
    """``n`` evenly spaced colours of the overlays' JET colour map, low to high, as #rrggbb."""
    ramp = np.linspace(0, 255, n).round().astype(np.uint8)[:, None]
    bgr = cv2.applyColorMap(ramp, cv2.COLORMAP_JET)[:, 0, :]
    return [f"#{r:02x}{g:02x}{b:02x}" for b, g, r in bgr.tolist()]


def _heat_only(amap: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
    """The colour map of an anomaly map alone (when its overlay is missing)."""
    vmin, vmax = scale
    levels = np.clip(np.rint((np.nan_to_num(amap.astype(np.float32)) - vmin) / (vmax - vmin)
                             * 255.0), 0, 255).astype(np.uint8)  # fmt: skip
    return cv2.cvtColor(cv2.applyColorMap(levels, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)


@dataclass(frozen=True)
class Picture:
    """An image written for the page: its link (relative to the page) and size; ``note`` says
    why there is none, or what it shows instead."""

    src: str | None
    width: int = 0
    height: int = 0
    note: str | None = None


class _Writer:
    """Writes the page's images under ``<run_id>_files/``, in a small thread pool.

    A card's image is the run's stored thumbnail (``tasks.thumbnails``, copied as it is) or, if
    there is none, its source decoded again; its overlay is blended from that small image and
    the anomaly map from the run's Zarr archive, downscaled (the lot's one colour scale), or
    else read from the overlay PNG. Nothing full-size is decoded when the run left thumbnails.
    """

    def __init__(self, files_uri: str, storage: StorageConfig | None, meta: dict[str, Any]):
        self.files_uri = files_uri.rstrip("/")
        self.link_base = quote(self.files_uri.rsplit("/", 1)[-1])
        self.storage = storage
        self.max_pixels = (meta.get("model") or {}).get("decode_max_pixels", DECODE_MAX_PIXELS)
        self.maps_uri = meta.get("maps_uri")
        self.thumbs_uri = meta.get("thumbs_uri")
        self._archive: Any = None
        self._lock = threading.Lock()
        self.pool = ThreadPoolExecutor(4, thread_name_prefix="lot-report")

    def _write(self, rel: str, data: bytes, shape: tuple[int, ...], note: str | None) -> Picture:
        # pictures are rebuilt with the page (anomalydino report): no fsync each; the page
        # itself, written last, is durable
        atomic_write_bytes(f"{self.files_uri}/{rel}", data, self.storage, durable=False)
        link = f"{self.link_base}/{quote(rel)}"
        return Picture(link, int(shape[1]), int(shape[0]), note)

    def _put(self, rel: str, rgb: np.ndarray, note: str | None = None) -> Picture:
        return self._write(rel, jpeg(rgb), rgb.shape, note)

    def _source(self, uri: str, edge: int, name: str) -> np.ndarray:
        return fit(decode_image(read_bytes(uri, self.storage), name, max_pixels=self.max_pixels),
                   edge)  # fmt: skip

    def _thumb(self, rel: str, uri: str | None, edge: int, name: str) -> Picture:
        return self._image(rel, uri, edge, name)[1]

    def _stored_thumb(self, image_id: str) -> tuple[bytes, np.ndarray] | None:
        if not self.thumbs_uri:
            return None
        try:
            data = read_bytes(thumb_uri(self.thumbs_uri, image_id), self.storage)
            return data, decode_jpeg(data)
        except Exception:  # none written (an older run, a reused overlay): decode the source
            return None

    def _stored_overlay(self, rel: str, image_id: str, edge: int) -> Picture | None:
        """The overlay thumbnail the scoring task rendered on the run's scale, as it is."""
        if not self.thumbs_uri:
            return None
        try:
            data = read_bytes(overlay_thumb_uri(self.thumbs_uri, image_id), self.storage)
            rgb = decode_jpeg(data)
        except Exception:  # none written (an older run): blend it from the map
            return None
        if max(rgb.shape[:2]) > edge:
            return None
        return self._write(rel, data, rgb.shape, None)

    def _image(
        self, rel: str, uri: str | None, edge: int, name: str, image_id: str | None = None
    ) -> tuple[np.ndarray | None, Picture]:
        """(the small RGB image or None, its picture on the page)."""
        stored = None if image_id is None else self._stored_thumb(image_id)
        if stored is not None:
            data, rgb = stored
            if max(rgb.shape[:2]) <= edge:
                return rgb, self._write(rel, data, rgb.shape, None)
            rgb = fit(rgb, edge)
            return rgb, self._put(rel, rgb)
        if not uri:
            return None, Picture(None, note="none was written by the run")
        try:
            rgb = self._source(uri, edge, name)
            return rgb, self._put(rel, rgb)
        except Exception as exc:  # a missing image costs its picture, not the page
            return None, Picture(None, note=str(exc).replace(uri, name))

    def _map(self, image_id: str) -> np.ndarray:
        with self._lock:
            if self._archive is None:
                from tasks.map_archive import MapArchive

                self._archive = MapArchive.open(
                    self.maps_uri, None, self.storage, create=False, read_only=True
                )
        return self._archive.get(image_id)

    def _overlay(self, rel: str, row: dict[str, Any], small, scale, edge: int) -> Picture:
        """The overlay on the lot's scale: the small image blended with the downscaled map; the
        map alone when the image is gone; the overlay PNG when the map cannot be read."""
        iid = row["image_id"]
        stored = self._stored_overlay(rel, iid, edge)
        if stored is not None:
            return stored
        try:
            amap = self._map(iid)
        except Exception as exc:
            why = f"anomaly map: {exc}"
            overlay_uri = row.get("overlay_uri")
            if not overlay_uri:
                return Picture(None, note=f"no overlay was written; {why}")
            try:
                return self._put(rel, self._source(overlay_uri, edge, f"overlay of {iid}"))
            except Exception as exc2:
                return Picture(None, note=f"overlay: {str(exc2).replace(overlay_uri, iid)}; {why}")
        if small is not None:
            return self._put(rel, render_overlay(small, fit_map(amap, small.shape[:2]), *scale))
        h, w = amap.shape[:2]
        k = min(1.0, edge / max(h, w))
        shape = (max(1, round(h * k)), max(1, round(w * k)))
        return self._put(rel, _heat_only(fit_map(amap, shape), scale), "anomaly map only")

    def card(self, row: dict[str, Any], edge: int, scale) -> Future:
        """(image, overlay) pictures of a flagged row."""

        def job() -> tuple[Picture, Picture]:
            iid = row["image_id"]
            key = _file_key(iid)
            small, image = self._image(f"images/{key}.jpg", row["image_uri"], edge, iid, iid)
            return image, self._overlay(f"overlays/{key}.jpg", row, small, scale, edge)

        return self.pool.submit(job)

    def reference(self, ref: dict[str, str]) -> Future:
        rel = f"references/{_file_key(ref['image_id'])}.jpg"
        return self.pool.submit(self._thumb, rel, ref["uri"], REF_EDGE, ref["image_id"])


@functools.cache
def _environment() -> Environment:
    """The templates' environment, compiled once per process."""
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(["html", "j2", "svg"], default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["score"] = fmt_score
    env.filters["file_key"] = _file_key
    env.filters["pct"] = lambda v: "" if v is None else f"{100 * v:.0f}%"
    return env


def render_page(context: dict[str, Any]) -> str:
    """The page's HTML from its context (see ``write_lot_report``)."""
    return _environment().get_template("lot_report.html.j2").render(**context)


def _card(row: dict[str, Any], threshold: float | None, pictures) -> dict[str, Any]:
    image, overlay = pictures
    h, w = row.get("image_height"), row.get("image_width")
    y, x = row.get("max_patch_y"), row.get("max_patch_x")
    peak = None
    if None not in (h, w, y, x) and h and w:
        peak = {"x": x, "y": y, "left": 100 * x / w, "top": 100 * y / h}
    ratio = row["score"] / threshold if threshold and row["score"] is not None else None
    return {"row": row, "image": image, "overlay": overlay, "peak": peak, "ratio": ratio}


def _old_threshold(previous: Previous | None, meta: dict, threshold: float | None):
    old = previous.threshold if previous is not None else meta.get("previous_threshold")
    if old is None or (threshold is not None and math.isclose(old, threshold)):
        return None  # the same line twice says nothing
    return old


def _missing_metadata(meta: dict[str, Any]) -> list[str]:
    """Metadata keys the page would use and this report does not have (shown in the footer)."""
    wanted = ["threshold_reason", "timings", "overlay_scale"]
    if meta.get("method") == "few_shot":
        wanted.append("references")
    return [k for k in wanted if k not in meta]


def write_lot_report(
    report_uri: str,
    storage: StorageConfig | None = None,
    *,
    thumb_edge: int = THUMB_EDGE,
    max_cards: int = MAX_CARDS,
    max_references: int = MAX_REFERENCES,
) -> str:
    """Write the HTML page of the run whose Parquet report is ``report_uri`` (local path or
    ``s3://``), with its images in ``<run_id>_files/``; return the page's URI, ``<run_id>.html``
    beside the report. Images that cannot be read are named on the page, never fatal."""
    t0 = time.perf_counter()
    meta = report_metadata(report_uri, storage)
    rows = report_rows(read_report(report_uri, storage))
    facts = summary_facts(meta, rows)
    threshold = facts["threshold"]
    previous = None
    if meta.get("reevaluates"):
        previous = previous_run(str(meta["reevaluates"]), rows, storage)
    scale = tuple(meta.get("overlay_scale") or overlay_scale(threshold, 0.0))
    flagged = [r for r in rows if r["verdict"] == "anomalous"]
    refs = reference_images(meta, storage)
    writer = _Writer(files_uri_of(report_uri), storage, meta)
    try:
        card_jobs = [(r, writer.card(r, thumb_edge, scale)) for r in flagged[:max_cards]]
        ref_jobs = [(ref, writer.reference(ref)) for ref in refs[:max_references]]
        cards = [_card(r, threshold, job.result()) for r, job in card_jobs]
        references = [{"image_id": ref["image_id"], "picture": j.result()} for ref, j in ref_jobs]
    finally:
        writer.pool.shutdown(wait=True)
    for r in rows:
        r["anchor"] = "img-" + _file_key(r["image_id"])
    scale_ctx = {"vmin": scale[0], "vmax": scale[1], "threshold": threshold}
    context = {
        "facts": facts,
        "rows": rows,
        "cards": cards,
        "n_uncarded": len(flagged) - len(cards),
        "carded": {c["row"]["image_id"] for c in cards},
        "errors": [r for r in rows if r["verdict"] == "error" or r.get("error")],
        "hist": histogram(
            [r["score"] for r in rows], threshold, _old_threshold(previous, meta, threshold)
        ),  # fmt: skip
        "scale": {**scale_ctx, "colours": jet_colours()},
        "references": references,
        "n_references": len(refs),
        "previous": previous,
        "meta_missing": _missing_metadata(meta),
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - t0, 2),
        "report_name": report_uri.rsplit("/", 1)[-1],
    }
    html_uri = html_uri_of(report_uri)
    atomic_write_bytes(html_uri, render_page(context).encode("utf-8"), storage)
    return html_uri
