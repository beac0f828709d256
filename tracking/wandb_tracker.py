"""One run directory as one Weights & Biases run, online or offline (WANDB_MODE=offline writes the run under
WANDB_DIR; `wandb sync` uploads it later).

Identity: the W&B run id is derived from the run directory's URL (`{run name}-{hash}`), so a mirror that
lost its record resumes the same run (`resume="allow"`) instead of starting a second one. Every row carries our
`step` as its x-axis (W&B's own `_step` only counts rows, and must only grow: an evaluation of an earlier
checkpoint arrives after later training steps); evaluations use `eval/step`. A rollback changes steps already
sent: the mirror then starts the next generation (`{id}-g2`, ...) holding the run's history as it stands, and
tags the old run `superseded`. W&B's rewind (`resume_from`) would keep one id, but it needs the server and
offline runs cannot use it."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import wandb

EXIT_CODE = {"completed": 0, "failed": 1, "stopped": 1}


def run_id(run_url: str, run_name: str, generation: int) -> str:
    slug = re.sub(r"[^a-z0-9-]+", "-", run_name.lower()).strip("-")[:40] or "run"
    base = f"{slug}-{hashlib.sha1(run_url.encode()).hexdigest()[:8]}"
    return base if generation == 1 else f"{base}-g{generation}"


class WandbTracker:
    kind = "wandb"

    def __init__(self, project: str, entity: str | None = None):
        self.project, self.entity = project, entity
        self.run: Any = None
        self.run_id: str | None = None

    def open(
        self,
        run_url: str,
        run_name: str,
        generation: int,
        known: str | None,
        delivered_step: int = -1,
    ) -> str:
        rid = known or run_id(run_url, run_name, generation)
        self.run = wandb.init(
            project=self.project,
            entity=self.entity,
            id=rid,
            name=run_name,
            resume="allow",
            tags=[f"generation-{generation}"],
            reinit="create_new",
            settings=wandb.Settings(
                init_timeout=60,
                silent=True,
                console="off",
                x_disable_stats=True,
                x_disable_meta=True,
                disable_git=True,
                save_code=False,
            ),
        )
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self.run.define_metric("eval/step")
        self.run.define_metric("eval/*", step_metric="eval/step")
        self.run.config.update(
            {"repro": {"run_dir": run_url, "generation": generation}}, allow_val_change=True
        )
        self.run_id = rid
        return rid

    def link(self) -> str:
        return (
            getattr(self.run, "url", None)
            or f"{self.project}/{self.run_id} (offline: `wandb sync` uploads it)"
        )

    def delivered_step(self) -> int | None:
        return None  # wandb's own process buffers and retries; the mirror's record is the truth

    def delivered_evaluations(self, keys: set[str]) -> set[tuple[int, str]] | None:
        return None

    def log_steps(self, rows: list[tuple[int, dict[str, float]]], timestamp_ms: int) -> None:
        for step, values in rows:
            self.run.log({"step": step, **values})

    def log_evaluation(self, step: int, values: dict[str, float], timestamp_ms: int) -> None:
        self.run.log({"eval/step": step, **values})

    def log_samples(self, new: list[dict[str, Any]], everything: list[dict[str, Any]]) -> None:
        """All samples so far as one table (W&B shows a table's latest version)."""
        rows = [[s["step"], i, t] for s in everything for i, t in enumerate(s.get("samples", []))]
        self.run.log({"samples": wandb.Table(columns=["step", "sample", "text"], data=rows)})

    def log_events(self, events: list[dict[str, Any]]) -> None:
        cols = ["time", "source", "event", "step", "detail"]
        data = [[e[c] for c in cols] for e in events]
        self.run.log({"events": wandb.Table(columns=list[str | int](cols), data=data)})
        self.run.summary["events"] = len(events)

    def log_config(self, config: dict[str, Any], first: bool) -> None:
        self.run.config.update(config, allow_val_change=True)

    def supersede(self, old_run_id: str) -> None:
        self.run.config.update({"repro": {"supersedes": old_run_id}}, allow_val_change=True)

    def retire(self) -> None:
        """The current generation's run, before the next one starts: tagged and finished."""
        self.run.tags = (*self.run.tags, "superseded")
        self.finish("stopped")

    def flush(self) -> None:
        """wandb's own process holds what was logged, and retries it until the server has it."""

    def finish(self, state: str) -> None:
        self.run.finish(exit_code=EXIT_CODE[state])
        self.run = None

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
