"""Per-step metrics: MFU against a known peak, `metrics.jsonl` in the run directory (written here, and read
back here by everyone who reads it), one console line a step."""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import torch

from common import store
from common.layout import RunDir

log = logging.getLogger(__name__)

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
    """Appends one JSON object per step to `{run_dir}/metrics.jsonl`.

    Local run dirs get each line appended at once. Object stores have no append, so there the whole file is
    rewritten, by a thread of its own so that the step never waits on the store: at most every `flush_seconds`,
    and at every flush() (checkpoints, exit), which waits for its write."""

    def __init__(self, run_dir: str, resume_step: int, flush_seconds: float = 30.0):
        self.url = RunDir(run_dir).metrics
        self.local = store.is_local(run_dir)
        self.flush_seconds = flush_seconds
        self._last_flush = time.monotonic()
        # Keep the history up to the checkpoint we resume from: steps after it are about to be redone.
        self.lines: list[str] = []
        if store.exists(self.url):
            for line in store.read_bytes(self.url).decode().splitlines():
                try:
                    if json.loads(line)["step"] < resume_step:
                        self.lines.append(line)
                except (ValueError, KeyError):
                    continue  # a torn last line from a killed writer
        store.write_bytes(self.url, "".join(x + "\n" for x in self.lines).encode())
        self._lines_lock = threading.Lock()
        self._write_lock = threading.Lock()  # one rewrite at a time, each of all the lines logged before it
        self._due = threading.Event()
        if not self.local:
            threading.Thread(target=self._writer, name="metrics-writer", daemon=True).start()

    def log(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":"))
        with self._lines_lock:
            self.lines.append(line)
        if self.local:
            store.append_text(self.url, line + "\n")
        elif time.monotonic() - self._last_flush > self.flush_seconds:
            self._last_flush = time.monotonic()
            self._due.set()

    def flush(self) -> None:
        """The file holds every line logged so far when this returns."""
        if not self.local:
            self._rewrite()
        self._last_flush = time.monotonic()

    def _rewrite(self) -> None:
        with self._write_lock:
            with self._lines_lock:
                data = "".join(x + "\n" for x in self.lines).encode()
            store.write_bytes(self.url, data)

    def _writer(self) -> None:
        while True:
            self._due.wait()
            self._due.clear()
            try:
                self._rewrite()
            except Exception as err:  # a store hiccup: the next rewrite or flush() carries these lines too
                log.warning("could not rewrite %s: %s", self.url, err)


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    url = RunDir(run_dir).metrics
    if not store.exists(url):
        return []
    return parse_metrics(store.read_bytes(url).decode(errors="replace").splitlines())


def parse_metrics(lines: list[str]) -> list[dict[str, Any]]:
    """Rows of metrics.jsonl lines, skipping the ones a killed writer tore (a partial line, or one that a
    resumed run's next line was appended to)."""
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def console_line(r: dict[str, Any], max_steps: int) -> str:
    parts = [f"step {r['step']:>6}/{max_steps}", f"loss {r['loss']:.4f}"]
    if "val_loss" in r:
        parts.append(f"val {r['val_loss']:.4f}")
    parts += [f"lr {r['lr']:.2e}", f"norm {r['grad_norm']:.3f}", f"{r['step_ms']:.1f} ms", f"{r['tokens_per_s']:,.0f} tok/s"]
    if r.get("mfu") is not None:
        parts.append(f"mfu {100 * r['mfu']:.1f}%")
    if r.get("mem_gb") is not None:
        parts.append(f"mem {r['mem_gb']:.1f} GB")
    return " | ".join(parts)
