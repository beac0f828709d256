"""lm-evaluation-harness on a checkpoint: a GPT-2-shaped one through its Hugging Face export and lm-eval's own
`hf` model (what anyone can reproduce from the export); any other in-process, through this project's model
(evaluation/lm_eval_model.py).

Hub-free use: tasks may come from `include_path` (task YAMLs with `dataset_path: json` and local data files),
and with HF_DATASETS_OFFLINE=1 the stock tasks read a pre-populated datasets cache.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DEFAULT_TASKS = ["hellaswag", "arc_easy", "piqa", "winogrande", "lambada_openai"]


def _task_manager(TaskManager: Any, tasks: list[str], include_path: str | None) -> Any:
    """lm-eval's task index. Indexing its ~14,000 stock task files takes ~13 s on a CPU core, on every evaluation;
    when `include_path` holds every task asked for, only that folder is indexed. Not for a group or tag defined
    there: its members may be stock tasks."""
    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if _local_index_serves(local, tasks):
            return local
        return TaskManager(include_path=include_path)
    return TaskManager()


def _local_index_serves(local: Any, tasks: list[str]) -> bool:
    """Whether an index of the include path alone has every task asked for as a plain task."""
    return set(tasks) <= set(local.all_subtasks)


def unknown_tasks(tasks: list[str], include_path: str | None = None) -> list[str]:
    """Those of `tasks` that lm-eval does not know (with the task YAMLs of `include_path`): asked before
    anything trains, so that a typo is one line at the start, not a failed evaluation of every checkpoint."""
    from lm_eval.tasks import TaskManager

    known = set(_task_manager(TaskManager, tasks, include_path).all_tasks)
    return [t for t in tasks if t not in known]


def run(
    hf_dir: str | Path | None,
    tasks: list[str],
    *,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "float32",
    limit: int | None = None,
    include_path: str | None = None,
    max_length: int = 1024,
    checkpoint: str | None = None,
) -> dict[str, Any]:
    """Results of `lm_eval.simple_evaluate` reduced to what we keep: metrics, versions, sample counts, config.
    The model: the Hugging Face export in `hf_dir`, or with `checkpoint` (hf_dir None) the checkpoint itself."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = _task_manager(TaskManager, tasks, include_path)
    if checkpoint is not None:
        from evaluation import lm_eval_model

        model = lm_eval_model.NAME
        args: dict[str, Any] = {"checkpoint": checkpoint, "dtype": dtype, "max_length": max_length}
    else:
        model, args = "hf", {"pretrained": str(hf_dir), "dtype": dtype, "max_length": max_length}
    out = lm_eval.simple_evaluate(
        model=model,
        model_args=args,
        tasks=list(tasks),
        batch_size=batch_size,
        device=device,
        limit=limit,
        task_manager=manager,
        log_samples=False,
        bootstrap_iters=0,
    )
    metrics = {
        task: {
            k.split(",")[0]: v
            for k, v in vals.items()
            if k != "alias" and not k.split(",")[0].endswith("_stderr")
        }
        for task, vals in out["results"].items()
    }
    return {
        "tasks": metrics,
        "versions": {k: v for k, v in out.get("versions", {}).items()},
        "n_samples": {
            k: v.get("effective", v.get("original")) for k, v in out.get("n-samples", {}).items()
        },
        "lm_eval_version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else None,
        "config": json.loads(
            json.dumps(
                {k: out["config"].get(k) for k in ("batch_size", "device", "limit")}, default=str
            )
        ),
    }
