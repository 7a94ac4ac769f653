"""Choosing the fastest runtime by measurement: interleaved rounds, median per runtime.

Rounds are interleaved (each round runs every candidate once, the order rotated every round) so
that a slow phase of a shared machine (another process, a frequency change) hits every candidate
alike instead of the one that happened to run then; the median of the rounds drops a stray
slow round. A short pause before each timed call lets the previous runtime's thread team stop
spinning: on the 2-core AMD EPYC here torch's EfficientNet-Lite0 pass took 178 ms right after an
ONNX Runtime call against 61 ms alone (load average 4.6 then: such figures are only indicative).
The figures are kept with the choice, so a cached choice can be read and argued with.

The pipeline never runs the model alone: its decoding threads preprocess the next images while
the model runs. ``beside`` runs such work on one thread for half of every 10 ms during a
measurement. Intel Xeon (AMX), ViT-S/14 448 bf16 batch 8, interleaved medians of 3, quiet vs
beside ``to_input_tensor`` of a 900 x 900 image: torch 71.0 / 69.8 vs 112.6 / 118.0 ms/img,
OpenVINO with 8 images per request 71.1 / 70.6 vs 100.9 / 104.0. Quiet, the two tie and either
could be picked; in the audit flow torch ran the lot at 149 ms/img, OpenVINO at 99-111.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

#: Rounds per calibration (after one warm-up call each): the spread between rounds on a busy
#: 2-core machine was 10-40%, the gap between the runtimes it chooses between 20-50%.
CALIBRATION_ROUNDS = 3
#: More rounds, up to MAX_CALIBRATION_ROUNDS, while the rounds so far took less than this: a
#: light model's medians of 3 rounds were within noise of each other. AMD EPYC, EfficientNet-
#: Lite0 at 448: 3 rounds picked ONNX Runtime (22.1 ms/img, OpenVINO 22.8) where 7 rounds of
#: bench/embed.py measured OpenVINO 19.4 [17.4-23.9] and ONNX 25.9 [17.9-30.5]. A ViT's three
#: rounds take longer than this already.
CALIBRATION_SECONDS = 3.0
MAX_CALIBRATION_ROUNDS = 15
#: More images per inference request are chosen only when their median is at most this fraction
#: of one image per request's: 8 ViT-S images at 448 hold ~0.15 GiB more working memory.
REQUEST_MARGIN = 0.95
#: ``beside``: the share of each ``BESIDE_PERIOD_S`` its thread works (the pipeline's decoding
#: and finishing threads took ~0.3-0.5 of the CPU time of an audit beside the model here).
BESIDE_DUTY = 0.5
BESIDE_PERIOD_S = 0.01


@dataclass(frozen=True)
class RuntimeFigures:
    """One runtime's measured speed: ms per image over the rounds."""

    runtime: str
    median_ms: float
    min_ms: float
    max_ms: float
    rounds: int

    def to_dict(self) -> dict:
        return {
            "runtime": self.runtime,
            "median_ms_per_image": round(self.median_ms, 3),
            "min_ms_per_image": round(self.min_ms, 3),
            "max_ms_per_image": round(self.max_ms, 3),
            "rounds": self.rounds,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> RuntimeFigures:
        return cls(
            runtime=str(d["runtime"]),
            median_ms=float(d["median_ms_per_image"]),
            min_ms=float(d["min_ms_per_image"]),
            max_ms=float(d["max_ms_per_image"]),
            rounds=int(d["rounds"]),
        )


@dataclass(frozen=True)
class Calibration:
    """The chosen runtime, every candidate's figures (fastest first) and the runtimes left out
    with their reason (an export that failed its check, a missing package). OpenVINO only:
    ``request_images``, the images per inference request, ``streams``, the requests run at
    once (one image each; ``OpenVinoRunner``), and ``request_figures``, their candidates'
    figures (named ``<n>`` for n images per request, ``<n> streams``; empty when not measured:
    one per request)."""

    choice: str
    figures: tuple[RuntimeFigures, ...]
    rejected: Mapping[str, str] = field(default_factory=dict)
    request_images: int = 1
    request_figures: tuple[RuntimeFigures, ...] = ()
    streams: int = 1

    def to_dict(self) -> dict:
        return {
            "choice": self.choice,
            "figures": [f.to_dict() for f in self.figures],
            "rejected": dict(self.rejected),
            "request_images": self.request_images,
            "streams": self.streams,
            "request_figures": [f.to_dict() for f in self.request_figures],
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> Calibration:
        figures = tuple(RuntimeFigures.from_dict(f) for f in d["figures"])
        choice = str(d["choice"])
        if choice not in {f.runtime for f in figures}:
            raise ValueError(f"calibration choice {choice!r} has no figures")
        request_images = int(d.get("request_images", 1))
        streams = int(d.get("streams", 1))
        if request_images < 1 or streams < 1:
            raise ValueError(
                f"request_images ({request_images}) and streams ({streams}) must be >= 1"
            )
        return cls(
            choice=choice,
            figures=figures,
            rejected=dict(d.get("rejected", {})),
            request_images=request_images,
            request_figures=tuple(
                RuntimeFigures.from_dict(f) for f in d.get("request_figures", ())
            ),
            streams=streams,
        )

    def text(self) -> str:
        parts = [f"{f.runtime} {f.median_ms:.1f} ms/img" for f in self.figures]
        left_out = [f"{name} left out: {why}" for name, why in self.rejected.items()]
        text = f"runtime {self.choice} (" + ", ".join(parts + left_out) + ")"
        if self.request_figures:
            sizes = ", ".join(f"{f.runtime}: {f.median_ms:.1f}" for f in self.request_figures)
            how = f"{self.request_images} image(s) per request"
            if self.streams > 1:
                how = f"{self.streams} streams, one image per request"
            text += f"; {how} (ms/img by images per request: {sizes})"
        return text


def measure(
    candidates: Mapping[str, Callable[[], object]],
    *,
    images_per_call: int,
    rounds: int = CALIBRATION_ROUNDS,
    min_seconds: float = CALIBRATION_SECONDS,
    max_rounds: int = MAX_CALIBRATION_ROUNDS,
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
    rejected: Mapping[str, str] | None = None,
    settle_s: float = 0.05,
    sleep: Callable[[float], object] = time.sleep,
) -> Calibration:
    """Time each candidate call (one batch of ``images_per_call`` images) in ``rounds``
    interleaved rounds after ``warmup`` untimed calls each, then in more rounds (up to
    ``max_rounds``) while the rounds took less than ``min_seconds``; the lowest median wins
    (ties: the first candidate given). ``settle_s``: pause before each timed call (see above)."""
    if not candidates:
        raise ValueError("no runtime to measure")
    if rounds < 1 or images_per_call < 1:
        raise ValueError(f"rounds ({rounds}) and images_per_call ({images_per_call}) must be >= 1")
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    began, r = clock(), 0
    while r < rounds or (r < max_rounds and clock() - began < min_seconds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            if settle_s > 0:
                sleep(settle_s)
            start = clock()
            candidates[name]()
            times[name].append(1000.0 * (clock() - start) / images_per_call)
        r += 1
    figures = [
        RuntimeFigures(name, statistics.median(t), min(t), max(t), r) for name, t in times.items()
    ]
    fastest = sorted(figures, key=lambda f: (f.median_ms, names.index(f.runtime)))
    return Calibration(fastest[0].runtime, tuple(fastest), dict(rejected or {}))


def openvino_variants(batch: int, threads: int, runtime: str = "openvino") -> list[str]:
    """The candidates that run ``runtime`` on a batch of ``batch`` images with ``threads``
    threads: one image per request (``runtime``), the whole batch per request
    (``<runtime>/<batch>``) and one image per request in ``min(batch, threads)`` streams
    (``<runtime>/<n> streams``), the last two only where there are several images (and
    threads)."""
    names = [runtime]
    if batch > 1:
        names.append(f"{runtime}/{batch}")
        if threads > 1:
            names.append(f"{runtime}/{min(batch, threads)} streams")
    return names


def request_mode(variant: str) -> tuple[int, int]:
    """(images per request, streams) of a variant name's suffix: ``<n>`` or ``<n> streams``."""
    count, _, unit = variant.partition(" ")
    if unit not in ("", "streams") or not count.isdigit() or int(count) < 1:
        raise ValueError(f"not a request variant: {variant!r}")
    return (1, int(count)) if unit else (int(count), 1)


def fold_request_sizes(
    calibration: Calibration, runtime: str = "openvino", *, margin: float = REQUEST_MARGIN
) -> Calibration:
    """Fold the candidates ``<runtime>/<variant>`` (``openvino_variants``: ``n`` images per
    request, or ``n streams``) into ``runtime``: a variant is chosen only when it is the fastest
    candidate and its median is at most ``margin`` of one image per request's (which holds the
    least memory); otherwise the next fastest candidate is. Their figures move to
    ``request_figures``, named by the variant."""
    prefix = f"{runtime}/"
    variants = [f for f in calibration.figures if f.runtime.startswith(prefix)]
    if not variants:
        return calibration
    single = next((f for f in calibration.figures if f.runtime == runtime), None)
    choice, (images, streams) = calibration.choice, (1, 1)
    for f in calibration.figures:  # fastest first
        if not f.runtime.startswith(prefix):
            choice = f.runtime
            break
        if single is None or f.median_ms <= margin * single.median_ms:
            choice, (images, streams) = runtime, request_mode(f.runtime[len(prefix) :])
            break
    renamed = [replace(f, runtime=f.runtime[len(prefix) :]) for f in variants]
    if single is not None:
        renamed.append(replace(single, runtime="1"))
    chosen = choice == runtime
    return Calibration(
        choice=choice,
        figures=tuple(f for f in calibration.figures if not f.runtime.startswith(prefix)),
        rejected=calibration.rejected,
        request_images=images if chosen else 1,
        request_figures=tuple(sorted(renamed, key=lambda f: f.median_ms)),
        streams=streams if chosen else 1,
    )


@contextmanager
def beside(work: Callable[[], object], *, duty: float = BESIDE_DUTY) -> Iterator[None]:
    """Run ``work`` repeatedly on one thread for ``duty`` of every ``BESIDE_PERIOD_S`` (then
    sleep) while the block runs: a measurement under the load the pipeline puts beside its
    model."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            began = time.perf_counter()
            while time.perf_counter() - began < duty * BESIDE_PERIOD_S:
                work()
            stop.wait((1.0 - duty) * BESIDE_PERIOD_S)

    thread = threading.Thread(target=loop, name="calibration-beside", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
