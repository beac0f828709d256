"""The run's events table in the UI: every skipped update and divergence (training's guard), rollback, hang,
lost node, straggler and cordoned host, in time order. One object holds the rows and publishes the table
itself, only when it has changed."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prefect.artifacts import acreate_table_artifact

from cluster.cordon import cordon_row, cordoned
from cluster.run_records import rollbacks
from common.layout import RunDir
from flows.watch import straggler_row


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def guard_row(e: dict[str, Any]) -> dict[str, Any]:
    """A line of training's events.jsonl (a skipped update, a divergence) as a row."""
    return {
        "time": _when(e.get("time", 0)),
        "event": e.get("event"),
        "step": e.get("step"),
        "data": e.get("data_batch", e.get("batches")),
        "reason": e.get("reason") or ", ".join(e.get("reasons", [])),
    }


def rollback_row(r: dict[str, Any]) -> dict[str, Any]:
    """A line of rollbacks.jsonl as a row."""
    return {
        "time": _when(r["time"]),
        "event": "rollback",
        "step": r["resume_step"],
        "data": f"skip {r['skip']}",
        "reason": f"diverged at steps {r['diverged_steps']}; set aside {r['set_aside']}",
    }


class EventsTable:
    """The rows of the run's events table: training's own events (read by the watcher: `guard_events`), the
    run's rollbacks, and what the flow saw happen (`add`). Those of earlier flow runs are there from the
    start: cordons still in force, stragglers found, rollbacks made."""

    def __init__(
        self,
        run: RunDir,
        title: str,
        key: str,
        guard_events: Callable[[], list[dict[str, Any]]],
        earlier_stragglers: list[dict[str, Any]],
    ):
        self.title, self.key, self.guard_events = title, key, guard_events
        self.rollbacks = rollbacks(run)
        self.health = [cordon_row(rec, None) for rec in cordoned(run).values()]
        self.health += [straggler_row(r) for r in earlier_stragglers]
        self._shown: list[dict[str, Any]] | None = None

    def add(self, row: dict[str, Any]) -> None:
        """A row of what the flow saw ({time, event, step, data, reason}): a hang, a lost node, a straggler,
        a cordon."""
        self.health.append(row)

    def rolled_back(self, rec: dict[str, Any]) -> None:
        self.rollbacks.append(rec)

    def rows(self) -> list[dict[str, Any]]:
        out = [guard_row(e) for e in self.guard_events()]
        out += [rollback_row(r) for r in self.rollbacks]
        out += [{**r, "time": _when(r["time"])} for r in self.health]
        return sorted(out, key=lambda r: r["time"])

    async def publish(self) -> None:
        """The table in the UI, when it differs from the one shown last (and is not empty)."""
        rows = self.rows()
        if not rows or rows == self._shown:
            return
        await acreate_table_artifact(
            rows,
            key=f"{self.key}-events",
            description=f"{self.title}: skipped updates, divergence, rollbacks, hangs, stragglers, "
            "cordoned hosts",
        )
        self._shown = rows
