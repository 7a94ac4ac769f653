"""What every flow needs around its job: the task runner, run ids, artifacts, the config."""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from prefect.task_runners import ThreadPoolTaskRunner

from flows.config import PipelineConfig, RuntimeSettings

T = TypeVar("T")

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")


def resolve_config(config: PipelineConfig | dict | None) -> PipelineConfig:
    """The flow's ``config`` parameter, or the config of this process's environment."""
    if config is None:
        return PipelineConfig.load()
    if isinstance(config, PipelineConfig):
        return config
    return PipelineConfig.model_validate(config)


def make_task_runner(runtime: RuntimeSettings):
    """The local thread runner (default), a Dask scheduler at ``dask_address``, or a Dask
    LocalCluster of ``dask_workers`` processes (one thread each)."""
    if runtime.dask_address or runtime.dask_workers:
        from prefect_dask import DaskTaskRunner

        if runtime.dask_address:
            return DaskTaskRunner(address=runtime.dask_address)
        return DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={
                "n_workers": runtime.dask_workers,
                "threads_per_worker": 1,
                "processes": True,
                "dashboard_address": None,
                "host": "127.0.0.1",
            },
        )
    return ThreadPoolTaskRunner(max_workers=runtime.concurrency)


def runner_name(runtime: RuntimeSettings) -> str:
    if runtime.dask_address:
        return f"dask({runtime.dask_address})"
    if runtime.dask_workers:
        return f"dask(LocalCluster, {runtime.dask_workers} workers)"
    return f"local threads ({runtime.concurrency})"


def with_runner(flow_obj: T, runtime: RuntimeSettings) -> T:
    """``flow_obj`` with the task runner the runtime settings ask for."""
    return flow_obj.with_options(task_runner=make_task_runner(runtime))  # type: ignore[attr-defined]


def current_flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    run_id = flow_run.id
    return str(run_id) if run_id else None


def new_run_id(started: datetime, flow_run_id: str | None) -> str:
    """``<UTC time>-<8 hex>``: sorts by time; the hex is the flow run id's start."""
    suffix = (flow_run_id or "").replace("-", "")[:8] or secrets.token_hex(4)
    return f"{started:%Y%m%dT%H%M%SZ}-{suffix}"


def utc_now() -> datetime:
    return datetime.now(UTC)


def chunked(items: Sequence[T], size: int) -> list[list[T]]:
    """Consecutive chunks of ``size`` (the last one shorter): fixed by the order alone."""
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key: lowercase letters, digits and dashes."""
    key = "-".join(re.sub(r"[^a-z0-9]+", "-", p.lower()).strip("-") for p in parts if p)
    return key[:100].strip("-") or "anomalydino"


def publish_markdown(markdown: str, key: str, description: str) -> None:
    """A markdown artifact on the current run (never fails the run)."""
    from prefect.artifacts import create_markdown_artifact

    from tasks.retry import run_logger

    try:
        create_markdown_artifact(markdown=markdown, key=key, description=description)
    except Exception as exc:  # the API being unreachable must not lose a finished report
        run_logger().warning("could not publish artifact %s: %s", key, exc)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|")
