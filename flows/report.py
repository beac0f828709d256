"""Everything a pretraining run shows in the Prefect UI: the progress bar and status, the curves as an image,
the table of every checkpoint's evaluations, and the final summary.

The Prefect UI renders markdown artifacts, images included; an image embedded as a data URI needs no route
from the browser to the store (S3 buckets and cluster filesystems rarely have one), so curves are inlined.
The PNG also lands in the run directory (curves.png) for everyone without the UI.
"""

from __future__ import annotations

import base64
import json
import re
import time
from typing import Any

from prefect.artifacts import (
    acreate_markdown_artifact,
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)

from common import store
from common.layout import RunDir
from evaluation.plots import render_png
from flows.evaluations import summary_row
from training import checkpoint as ck
from training.metrics import read_metrics
from training.telemetry import last_window


def artifact_key(run_name: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", run_name.lower()).strip("-") or "run"


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """Step / max steps, tokens seen and ETA, from metrics.jsonl: the progress artifact (the percentage and the
    status in one line, updated in place), a status table (a markdown artifact, a new version each time), and
    the log. Each artifact update is an event that every watcher of the run (the UI, `prefect deployment run
    --watch`) receives, so the bar moves in steps of `ui_every_percent` at most every `ui_every_s` seconds
    (about twenty events a run), the table at most every `table_every_s`, and both at the end (`force`)."""

    def __init__(
        self,
        artifact_id,
        max_steps: int,
        log,
        key: str,
        ui_every_s: float = 10.0,
        ui_every_percent: float = 5.0,
        table_every_s: float = 60.0,
    ):
        self.id, self.max_steps, self.log, self.key = artifact_id, max_steps, log, key
        self.ui_every_s, self.ui_every_percent = ui_every_s, ui_every_percent
        self.table_every_s = table_every_s
        self.first: tuple[float, int] | None = None
        self.last_log = self.last_ui = self.last_table = -float("inf")
        self.shown_percent = -100.0  # on the progress bar
        self.table_step = -1  # the step the status table shows

    @classmethod
    async def create(cls, run_name: str, max_steps: int, log, key: str) -> Progress:
        return cls(
            await acreate_progress_artifact(0.0, description=f"{run_name}: training progress"),
            max_steps,
            log,
            key,
        )

    async def update(self, metrics: list[dict[str, Any]], force: bool = False) -> None:
        if not metrics:
            return
        done, now = metrics[-1]["step"] + 1, time.monotonic()
        if self.first is None or done < self.first[1]:
            self.first = (now, done)
        t0, s0 = self.first
        rate = (done - s0) / (now - t0) if now > t0 and done > s0 else 0.0
        eta = _duration((self.max_steps - done) / rate) if rate else "-"
        tokens = f"{metrics[-1].get('tokens_seen', 0):,}"
        if force or now - self.last_log >= 30:
            self.last_log = now
            self.log.info(
                "step %d/%d (%.1f%%), %s tokens seen, ETA %s",
                done,
                self.max_steps,
                100.0 * done / self.max_steps,
                tokens,
                eta,
            )
        percent = round(100.0 * min(done, self.max_steps) / self.max_steps, 1)
        moved = percent >= self.shown_percent + self.ui_every_percent  # a change worth an event
        if force or (moved and now - self.last_ui >= self.ui_every_s):
            self.last_ui, self.shown_percent = now, percent
            line = f"step {done} / {self.max_steps}, {tokens} tokens seen, ETA {eta}"
            await aupdate_progress_artifact(self.id, percent, description=line)
        if done != self.table_step and (force or now - self.last_table >= self.table_every_s):
            self.last_table, self.table_step = now, done
            await self._table(metrics, done, tokens, eta)

    async def _table(self, metrics: list[dict[str, Any]], done: int, tokens: str, eta: str) -> None:
        last = metrics[-1]
        val = next((m["val_loss"] for m in reversed(metrics) if "val_loss" in m), None)
        await acreate_markdown_artifact(
            f"| step | tokens seen | train loss | val loss | tokens/s | ETA | slowest rank |\n"
            f"| --- | --- | --- | --- | --- | --- | --- |\n"
            f"| {done} / {self.max_steps} | {tokens} | {last['loss']:.4f} | "
            f"{f'{val:.4f}' if val is not None else '-'} | {last.get('tokens_per_s', 0):,.0f} | {eta} | "
            f"{slowest_rank(metrics)} |\n",
            key=f"{self.key}-status",
            description="training status: step, tokens seen, losses, ETA, the "
            "slowest rank of the last telemetry window",
        )


def slowest_rank(metrics: list[dict[str, Any]]) -> str:
    """The last telemetry window's slowest rank, as `host:rank, B ms busy (median rank M ms) at step S`."""
    w = last_window(metrics)
    if w is None:
        return "-"
    return (
        f"{w['slowest_host']}:{w['slowest_rank']}, {w['rank_busy_ms_max']:.0f} ms busy (median rank "
        f"{w['rank_busy_ms_median']:.0f} ms) at step {w['step']}"
    )


def checkpoint_rows(
    evals: dict[int, dict[str, Any]], metrics: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """One row per evaluated checkpoint: step, the val loss measured last at or before it, its evaluations."""
    val = [(m["step"] + 1, m["val_loss"]) for m in metrics if "val_loss" in m]
    rows = []
    for step in sorted(evals):
        v = next((loss for s, loss in reversed(val) if s <= step), None)
        row = summary_row(evals[step])
        rows.append(
            {
                "step": step,
                "val_loss": round(v, 4) if v is not None else None,
                **{k: x for k, x in row.items() if k != "step"},
            }
        )
    return rows


def best_checkpoint(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The checkpoint with the highest HellaSwag acc_norm, or (without evaluations) the lowest val loss."""
    for metric, better in (("hellaswag_acc_norm", max), ("val_loss", min)):
        scored = [r for r in rows if r.get(metric) is not None]
        if scored:
            best = better(scored, key=lambda r: r[metric])
            return {
                "step": best["step"],
                "checkpoint": best.get("checkpoint"),
                "metric": metric,
                "value": best[metric],
            }
    return None


async def publish_checkpoint_table(rows: list[dict[str, Any]], title: str, key: str) -> None:
    await acreate_table_artifact(
        rows, key=f"{key}-checkpoints", description=f"{title}: evaluation of every checkpoint"
    )


async def publish_curves(run_dir: str, title: str, key: str) -> str | None:
    """Loss and HellaSwag curves: PNG into {run_dir}/curves.png and a markdown artifact showing it."""
    if not read_metrics(run_dir):
        return None
    png = render_png(run_dir, title)
    url = RunDir(run_dir).curves
    store.write_bytes(url, png)
    data = base64.b64encode(png).decode()
    await acreate_markdown_artifact(
        f"## {title}: training curves\n\n![loss and HellaSwag curves](data:image/png;base64,"
        f"{data})\n\n`{url}`\n",
        key=f"{key}-curves",
        description=f"{title}: loss and HellaSwag curves",
    )
    return url


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _samples(run_dir: str, n: int = 3) -> list[str]:
    url = RunDir(run_dir).samples
    if not store.exists(url):
        return []
    lines = [ln for ln in store.read_bytes(url).decode().splitlines() if ln.strip()]
    if not lines:
        return []
    last = json.loads(lines[-1])
    return [f"step {last['step']}: {s}" for s in last["samples"][:n]]


async def publish_summary(
    run_dir: str, title: str, key: str, max_steps: int, result: dict[str, Any]
) -> None:
    lines = [
        f"# {title}",
        "",
        f"- final step: **{result['final_step']} / {max_steps}**, final train loss: {_num(result['final_loss'])}, "
        f"val loss: {_num(result.get('final_val_loss'))}",
        f"- submissions: {result['submissions']}, wall time: {result['minutes']} min",
        f"- run directory: `{run_dir}`",
    ]
    tracker = result.get("tracker")
    if tracker and tracker.get("run_id"):
        lines.append(
            f"- {tracker['tracker']} run: `{tracker['run_id']}`"
            + (
                f" ({tracker['link']})"
                if tracker.get("link") not in (None, tracker["run_id"])
                else ""
            )
        )
    best = result.get("best_checkpoint")
    if best:
        lines.append(
            f"- best checkpoint: **step {best['step']}** ({best['metric']} {best['value']:.4f}): "
            f"`{best['checkpoint']}`"
        )
    lines.append("")
    checkpoints = ck.valid_checkpoints(run_dir)
    if checkpoints:
        lines += ["| step | checkpoint | HF export |", "| --- | --- | --- |"]
        for c in checkpoints:
            export = RunDir(run_dir).export(c.step)
            lines.append(
                f"| {c.step} | `{c.url}` | {f'`{export}`' if store.exists(export) else '-'} |"
            )
        lines.append("")
    samples = _samples(run_dir)
    if samples:
        lines += ["## samples", ""] + [f"> {s!r}" for s in samples] + [""]
    await acreate_markdown_artifact(
        "\n".join(lines), key=f"{key}-summary", description=f"{title}: run summary"
    )
