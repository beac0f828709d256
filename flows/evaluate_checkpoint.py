"""`evaluate-checkpoint` (deployed as `evaluate`): one checkpoint, or a run directory's latest, on HellaSwag
and/or lm-eval tasks, in its own process (flows/evaluations.py); the results are cached next to it."""

from __future__ import annotations

import json
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_table_artifact

from flows.evaluations import run_evaluation, summary_row


@flow(name="evaluate-checkpoint", log_prints=True)
async def evaluate_checkpoint(
    checkpoint: str,
    tasks: list[str] = ["hellaswag"],  # noqa: B006 (the UI form's default; never mutated)
    hellaswag_data: str | None = None,
    limit: int | None = None,
    include_path: str | None = None,
) -> dict[str, Any]:
    """Evaluate one checkpoint (or a run dir's latest) on HellaSwag and/or lm-eval tasks."""
    result = await run_evaluation(checkpoint, tasks, hellaswag_data, limit, include_path)
    if "error" in result:
        raise RuntimeError(f"evaluation of {checkpoint} failed: {result['error']}")
    get_run_logger().info("%s", json.dumps(summary_row(result)))
    await acreate_table_artifact([summary_row(result)], description=f"evaluation of {checkpoint}")
    return result
