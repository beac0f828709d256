"""Per-step metrics: MFU against a known peak, `metrics.jsonl` in the run directory (written here, and read
back here by everyone who reads it), one console line a step."""

from __future__ import annotations

import json
from typing import Any

import torch

from common import store
from common.layout import RunDir
from common.logfiles import LogFiles, LogTail

# Dense bf16 peak FLOP/s per GPU (no sparsity). Unknown devices (CPU included) report no MFU rather than a guess.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "A100": 312e12,
    "A10G": 70e12,
    "L4": 121e12,
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_FLOPS.items():  # ordered so "H100 PCIe" wins over "H100"
        if key in name:
            return peak
    return None


class MetricsLog:
    """Appends one JSON object per step to `{run_dir}/metrics.jsonl`, through `files` (common/logfiles.py: at
    once on a local disk; on an object store by a thread, never blocking the step, and complete at every
    flush(): checkpoints, exit). Lines of the steps a resumed run is about to redo are dropped at start."""

    def __init__(self, run_dir: str, resume_step: int, files: LogFiles | None = None):
        self.files = files or LogFiles()
        self.url = RunDir(run_dir).metrics
        self.file = self.files.open(
            self.url, keep=lambda line: line_step(line) < resume_step, create=True
        )

    def log(self, record: dict[str, Any]) -> None:
        self.file.append(json.dumps(record, separators=(",", ":")) + "\n")

    def flush(self) -> None:
        """The file holds every line logged so far when this returns."""
        self.files.flush()


def line_step(line: str) -> float:
    """The step of a metrics (or telemetry) line; infinite for a line a killed writer tore (never kept)."""
    try:
        step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")
    return step if isinstance(step, (int, float)) else float("inf")


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    url = RunDir(run_dir).metrics
    if not store.exists(url):
        return []
    return parse_metrics(store.read_bytes(url).decode(errors="replace").splitlines())


class MetricsTail:
    """A run's metrics rows as the run writes them: each read returns the rows added since the last, reading
    only the new bytes (polling a long run on an object store is one small ranged read, not the whole file).
    A resumed run writes again the steps it redoes: a reader that keeps rows by step keeps the latest."""

    def __init__(self, run_dir: str):
        self.tail = LogTail(RunDir(run_dir).metrics)

    def read(self) -> list[dict[str, Any]]:
        return parse_metrics(self.tail.read())


class ValCurve:
    """A run's val loss by step, brought up to date from the lines added since the last read. A resumed run
    writes again from the step it resumed at: the points from there on are the redone ones, not the old."""

    def __init__(self, run_dir: str):
        self.metrics = MetricsTail(run_dir)
        self.points: dict[int, float] = {}
        self.last = -1  # the step of the last row read

    def read(self) -> list[tuple[int, float]]:
        for r in self.metrics.read():
            step = r["step"]
            if step <= self.last:  # a resumed run redoes these steps
                self.points = {k: v for k, v in self.points.items() if k < step}
            self.last = step
            if isinstance(r.get("val_loss"), (int, float)):
                self.points[step] = r["val_loss"]
        return sorted(self.points.items())


def parse_metrics(lines: list[str]) -> list[dict[str, Any]]:
    """Rows of metrics.jsonl lines, skipping the ones a killed writer tore (a partial line, or one that a
    resumed run's next line was appended to)."""
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict):
            continue
        step, loss = row.get("step"), row.get("loss", 0.0)
        # a line of another shape (edited, or from another tool) would break every reader's arithmetic
        if isinstance(step, int) and not isinstance(step, bool) and isinstance(loss, (int, float)):
            rows.append(row)
    return rows


def console_line(r: dict[str, Any], max_steps: int) -> str:
    parts = [f"step {r['step']:>6}/{max_steps}", f"loss {r['loss']:.4f}"]
    if "val_loss" in r:
        parts.append(f"val {r['val_loss']:.4f}")
    parts += [
        f"lr {r['lr']:.2e}",
        f"norm {r['grad_norm']:.3f}",
        f"{r['step_ms']:.1f} ms",
        f"{r['tokens_per_s']:,.0f} tok/s",
    ]
    if r.get("mfu") is not None:
        parts.append(f"mfu {100 * r['mfu']:.1f}%")
    if r.get("mem_gb") is not None:
        parts.append(f"mem {r['mem_gb']:.1f} GB")
    return " | ".join(parts)
