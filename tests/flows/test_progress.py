"""Progress of long work (flows/progress.py): periodic log lines when stderr is no terminal,
a tqdm bar with the rate and ETA when it is, and ``gather`` counting futures as they finish."""

from __future__ import annotations

import io
import logging

from flows.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def logger() -> tuple[logging.Logger, Lines]:
    log = logging.getLogger("test-progress")
    log.handlers[:] = [handler := Lines()]
    log.setLevel(logging.INFO)
    log.propagate = False
    return log, handler


def test_not_a_terminal_logs_a_line_about_every_ten_seconds(monkeypatch) -> None:
    monkeypatch.delenv("ANOMALYDINO_PROGRESS", raising=False)
    log, out = logger()
    clock = Clock()
    stream = io.StringIO()  # not a TTY
    with Progress(100, "scoring bottle/lot-1", stream=stream, logger=log, clock=clock) as p:
        assert p.mode == "log"
        for _ in range(10):  # 10 images every 4 s: lines at 12 s, 24 s, 36 s
            clock.now += 4.0
            p.update(10)
    assert stream.getvalue() == ""  # no bar, no control characters
    assert out.lines[:3] == [
        "scoring bottle/lot-1: 30/100 images (2.5 images/s, ETA 28s)",
        "scoring bottle/lot-1: 60/100 images (2.5 images/s, ETA 16s)",
        "scoring bottle/lot-1: 90/100 images (2.5 images/s, ETA 4s)",
    ]
    assert out.lines[3:] == ["scoring bottle/lot-1: 100/100 images in 40s (2.5 images/s)"]


def test_short_work_logs_nothing(monkeypatch) -> None:
    monkeypatch.delenv("ANOMALYDINO_PROGRESS", raising=False)
    log, out = logger()
    clock = Clock()
    with Progress(5, "embedding", stream=io.StringIO(), logger=log, clock=clock) as p:
        clock.now += 3.0
        p.update(5)
    assert out.lines == []


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_with_rate_and_eta(monkeypatch) -> None:
    monkeypatch.delenv("ANOMALYDINO_PROGRESS", raising=False)
    log, out = logger()
    term = Terminal()
    with Progress(40, "embedding bottle/lot-1", stream=term, logger=log, bar_refresh_s=0) as p:
        assert p.mode == "bar"
        for _ in range(4):
            p.update(10)
    text = term.getvalue()
    assert "embedding bottle/lot-1" in text and "10/40" in text and "images/s" in text
    assert "<" in text  # tqdm's elapsed<remaining (the ETA)
    assert out.lines == []
    monkeypatch.setenv("ANOMALYDINO_PROGRESS", "off")
    assert Progress(3, "x", stream=Terminal(), logger=log).mode == "off"


def test_gather_counts_futures_as_they_finish(prefect_harness) -> None:
    from prefect import flow, task

    from flows.progress import gather

    @task
    def double(xs: list[int]) -> list[int]:
        return [2 * x for x in xs]

    @flow
    def job() -> tuple[list, int]:
        chunks = [[1, 2, 3], [4, 5], [6]]
        futures = [double.submit(c) for c in chunks]
        progress = Progress(6, "doubling", mode="log", logger=logging.getLogger("x"))
        out = gather(futures, [len(c) for c in chunks], progress)
        return out, progress.done

    assert job() == ([[2, 4, 6], [8, 10], [12]], 6)
