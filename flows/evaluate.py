"""The MVTec-protocol evaluation (``tasks.evaluation.run_evaluation``: files and model in,
``anomalydino_core.evaluation`` on the arrays) as a flow run."""

from __future__ import annotations

import pandas as pd
from prefect import flow

from anomalydino_core.evaluation import EvaluationRequest, summary_table
from flows.progress import Progress
from flows.runtime import artifact_key, publish_markdown
from tasks.evaluation import run_evaluation
from tasks.models import remote_fetcher
from tasks.retry import run_logger


@flow(name="evaluate", validate_parameters=False)
def evaluate(request: EvaluationRequest) -> pd.DataFrame:
    """Evaluate one category (k-shot x seeds, or zero-shot); one row per shots x seed."""
    log = run_logger()

    def start_progress(total: int, what: str) -> Progress:
        return Progress(total, f"{request.category}: {what}", logger=log)

    df = run_evaluation(
        request, log=log.info, fetch_remote=remote_fetcher(None), start_progress=start_progress
    )
    publish_markdown(summary_table(df), artifact_key("evaluate", request.category), "evaluation")
    return df
