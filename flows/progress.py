"""Progress of long work (embedding a lot, screening, building a bank, evaluating): a tqdm bar
with images/s and the ETA when stderr is a terminal, else a plain log line about every 10 s
(and one at the end when the work took that long). Never more than that: logs of unattended
runs stay readable.

    with Progress(len(items), "embedding bottle/lot-1") as progress:
        results = gather(futures, [len(c) for c in chunks], progress)

``ANOMALYDINO_PROGRESS`` = ``bar`` | ``log`` | ``off`` overrides the choice.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO, TypeVar

T = TypeVar("T")
LOG_EVERY_S = 10.0


def _mode(stream: TextIO) -> str:
    wanted = os.environ.get("ANOMALYDINO_PROGRESS", "").strip().lower()
    if wanted in ("bar", "log", "off"):
        return wanted
    try:
        return "bar" if stream.isatty() else "log"
    except (AttributeError, ValueError):
        return "log"


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """``total`` units of work (images) done in steps (``update``)."""

    def __init__(
        self,
        total: int,
        description: str,
        *,
        unit: str = "images",
        stream: TextIO | None = None,
        logger: logging.Logger | logging.LoggerAdapter | None = None,
        every_s: float = LOG_EVERY_S,
        mode: str | None = None,
        clock=time.monotonic,
        bar_refresh_s: float = 0.5,
    ) -> None:
        self.total, self.description, self.unit = int(total), description, unit
        self.done = 0
        self.every_s = every_s
        self._clock = clock
        self._start = self._last_line = clock()
        self._lines = 0
        stream = stream if stream is not None else sys.stderr
        self.mode = mode or _mode(stream)
        if logger is None:
            from tasks.retry import run_logger

            logger = run_logger()
        self._log = logger
        self._bar: Any = None
        if self.mode == "bar" and self.total > 0:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total,
                desc=description,
                unit=" " + unit,
                mininterval=bar_refresh_s,
                file=stream,
                dynamic_ncols=True,
                leave=False,
                smoothing=0.1,
            )

    def rate(self) -> float:
        elapsed = self._clock() - self._start
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        """``<description>: done/total images (x images/s, ETA ...)``."""
        rate = self.rate()
        eta = (self.total - self.done) / rate if rate > 0 else None
        text = f"{self.description}: {self.done}/{self.total} {self.unit} ({rate:.1f} {self.unit}/s"
        if self.done < self.total and eta is not None:
            text += f", ETA {_duration(eta)}"
        return text + ")"

    def update(self, n: int = 1) -> None:
        self.done = min(self.done + int(n), self.total) if self.total else self.done + int(n)
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "log":
            now = self._clock()
            if now - self._last_line >= self.every_s and self.done < self.total:
                self._last_line = now
                self._lines += 1
                self._log.info("%s", self.line())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode == "log" and self._clock() - self._start >= self.every_s:
            elapsed = self._clock() - self._start
            self._log.info(
                "%s: %d/%d %s in %s (%.1f %s/s)", self.description, self.done, self.total,
                self.unit, _duration(elapsed), self.rate(), self.unit,
            )  # fmt: skip

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def gather(futures: Sequence[Any], sizes: Sequence[int], progress: Progress) -> list[Any]:
    """The results of Prefect futures, in their order, counting ``sizes[i]`` units when future
    ``i`` completes (in completion order). A failed future raises here, like ``result()``."""
    from prefect.futures import as_completed

    size_of = {id(f): int(n) for f, n in zip(futures, sizes, strict=True)}
    for fut in as_completed(list(futures)):
        progress.update(size_of[id(fut)])
    return [f.result() for f in futures]
