"""What a pretraining run shows in the Prefect UI: curves as an image, a checkpoint table, a summary.

The Prefect UI renders markdown artifacts, images included; an image embedded as a data URI needs no route
from the browser to the store (S3 buckets and cluster filesystems rarely have one), so curves are inlined.
The PNG also lands in the run directory (curves.png) for everyone without the UI.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

from prefect.artifacts import create_markdown_artifact

from training import checkpoint as ck
from training import store
from training.plots import read_metrics, render_png


def artifact_key(run_name: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", run_name.lower()).strip("-") or "run"


async def publish_curves(run_dir: str, title: str, key: str) -> str | None:
    """Loss and HellaSwag curves: PNG into {run_dir}/curves.png and a markdown artifact showing it."""
    if not read_metrics(run_dir):
        return None
    png = render_png(run_dir, title)
    url = store.join(run_dir, "curves.png")
    store.write_bytes(url, png)
    data = base64.b64encode(png).decode()
    await create_markdown_artifact(f"## {title}: training curves\n\n![loss and HellaSwag curves](data:image/png;base64,"
                                   f"{data})\n\n`{url}`\n", key=f"{key}-curves",
                                   description=f"{title}: loss and HellaSwag curves")
    return url


def _samples(run_dir: str, n: int = 3) -> list[str]:
    url = store.join(run_dir, "samples.jsonl")
    if not store.exists(url):
        return []
    lines = [ln for ln in store.read_bytes(url).decode().splitlines() if ln.strip()]
    if not lines:
        return []
    last = json.loads(lines[-1])
    return [f"step {last['step']}: {s}" for s in last["samples"][:n]]


async def publish_summary(run_dir: str, title: str, key: str, max_steps: int, result: dict[str, Any]) -> None:
    lines = [f"# {title}", "",
             f"- final step: **{result['final_step']} / {max_steps}**, final train loss: {result['final_loss']}",
             f"- attempts: {result['attempts']}, wall time: {result['minutes']} min",
             f"- run directory: `{run_dir}`", ""]
    checkpoints = ck.valid_checkpoints(run_dir)
    if checkpoints:
        lines += ["| step | checkpoint | HF export |", "| --- | --- | --- |"]
        for c in checkpoints:
            export = store.join(run_dir, "exports", f"step_{c.step:06d}-hf")
            lines.append(f"| {c.step} | `{c.url}` | {f'`{export}`' if store.exists(export) else '-'} |")
        lines.append("")
    samples = _samples(run_dir)
    if samples:
        lines += ["## samples", ""] + [f"> {s!r}" for s in samples] + [""]
    await create_markdown_artifact("\n".join(lines), key=f"{key}-summary", description=f"{title}: run summary")
