"""Per-rank telemetry: every `train.telemetry_every` steps, each rank's mean step time, busy time and data wait
over the window, its memory, and where NVML answers its GPU's utilization, SM clock, temperature and power,
gathered in one all_gather of a small fixed-size float tensor (the only collective this adds to the loop; the
ranks' host names are gathered once, at start).

Why busy time: under DDP the gradient all-reduce at the end of backward makes every rank's step last as long
as the slowest rank's, so step times cannot tell the ranks apart. A rank's busy time runs from its step's start
until its own backward has produced its last gradient: its data wait, forward and backward, no waiting on
peers (on CUDA measured with events on the compute stream). The rank with the most is the one the others wait
for: the slowest rank.

    {run}/telemetry.jsonl   one line per window, by rank 0: {"step", "steps", "time", "ranks": [{"rank", "host",
                            "step_ms", "busy_ms", "data_ms", "mem_alloc_gb", "mem_reserved_gb", "gpu_util",
                            "sm_clock_mhz", "temp_c", "power_w"}, ...]}

Times are means per step over the window; memory is the peak since the start; the NVML figures are sampled at
the window's end; a figure a rank cannot measure is null. That step's metrics line gets the window's summary
(`window_summary`), which the flow watches for stragglers (`StragglerWatch`, read back here).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from common.heartbeat import host_name
from training import distributed
from training.distributed import DistInfo

log = logging.getLogger(__name__)

FIELDS = (
    "step_ms",
    "busy_ms",
    "data_ms",
    "mem_alloc_gb",
    "mem_reserved_gb",
    "gpu_util",
    "sm_clock_mhz",
    "temp_c",
    "power_w",
)

# torch's NVML helpers (they need the nvidia-ml-py package; a GPU may not report every figure)
NVML_READERS: dict[str, Callable[[torch.device], float]] = {
    "gpu_util": lambda d: float(torch.cuda.utilization(d)),
    "sm_clock_mhz": lambda d: float(torch.cuda.clock_rate(d)),
    "temp_c": lambda d: float(torch.cuda.temperature(d)),
    "power_w": lambda d: torch.cuda.power_draw(d) / 1000,  # mW
}


class RankTelemetry:
    """One rank's window of telemetry. The loop calls `step_started`/`step_ended` around each step, fetches its
    batches through `timed`, and at a `due` step every rank calls `gather` (rank 0 gets every rank's values).
    `last_grads`: parameters whose gradients this rank's backward produces last (those used first in the
    forward); `every` = 0 turns all of it off."""

    def __init__(
        self, every: int, info: DistInfo, device: torch.device, last_grads: list[torch.Tensor]
    ):
        self.every, self.info, self.device = every, info, device
        self.hosts = distributed.all_gather_objects(host_name()) if every else [host_name()]
        self._nvml = dict(NVML_READERS) if device.type == "cuda" else {}
        self._cuda = device.type == "cuda"
        if self._cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._ready = torch.cuda.Event(enable_timing=True)
        self._t0 = self._ready_at = 0.0
        self._grads_ready = False
        self.busy_s: float | None = None  # the last step's (None when not measured)
        self._hook = (
            torch.autograd.graph.register_multi_grad_hook(last_grads, self._on_grads, mode="all")
            if every
            else None
        )
        self._reset()

    def _reset(self) -> None:
        self._steps, self._step_s, self._busy_s, self._data_s = 0, 0.0, 0.0, 0.0

    def _on_grads(self, _grads) -> None:
        if self._cuda:
            self._ready.record()  # on the stream the backward runs on: when the GPU gets there
        else:
            self._ready_at = time.perf_counter()
        self._grads_ready = True

    def timed(self, next_batch: Callable[[], Any]) -> Callable[[], Any]:
        """`next_batch`, with the time spent waiting for it counted as this window's data wait."""

        def fetch():
            t0 = time.perf_counter()
            try:
                return next_batch()
            finally:
                self._data_s += time.perf_counter() - t0

        return fetch

    def step_started(self) -> None:
        self._grads_ready = False
        self._t0 = time.perf_counter()
        if self._cuda and self.every:
            self._start.record()

    def step_ended(self, step_s: float) -> None:
        """Counts the step into the window; its busy time is then `busy_s`. On CUDA call it after the step's
        synchronize: both events are done by then."""
        self.busy_s = None
        if self._grads_ready:
            self.busy_s = (
                self._start.elapsed_time(self._ready) / 1000
                if self._cuda
                else self._ready_at - self._t0
            )
        self._steps += 1
        self._step_s += step_s
        self._busy_s += self.busy_s if self.busy_s is not None else step_s

    @property
    def steps(self) -> int:
        """Steps in the window so far."""
        return self._steps

    def due(self, step: int) -> bool:
        """Whether step `step` ends a window (the same answer on every rank)."""
        return self.every > 0 and (step + 1) % self.every == 0 and self._steps > 0

    def gather(self) -> list[dict[str, Any]] | None:
        """Every rank's values for the window just ended, on rank 0 (None on the others); a new window starts."""
        n = max(self._steps, 1)
        mine = [
            1000 * self._step_s / n,
            1000 * self._busy_s / n,
            1000 * self._data_s / n,
            *self._device_stats(),
        ]
        rows = distributed.all_gather(torch.tensor(mine, dtype=torch.float64, device=self.device))
        self._reset()
        if not self.info.is_master:
            return None
        return [
            {
                "rank": rank,
                "host": self.hosts[rank],
                **{k: None if math.isnan(v) else round(v, 3) for k, v in zip(FIELDS, values)},
            }
            for rank, values in enumerate(torch.stack(rows).cpu().tolist())
        ]

    def _device_stats(self) -> list[float]:
        """Memory and NVML figures in FIELDS order after the three times; NaN for what cannot be measured."""
        if not self._cuda:
            return [math.nan] * (len(FIELDS) - 3)
        out = [
            torch.cuda.max_memory_allocated(self.device) / 1e9,
            torch.cuda.max_memory_reserved(self.device) / 1e9,
        ]
        for name in FIELDS[5:]:
            reader = self._nvml.get(name)
            try:
                out.append(reader(self.device) if reader else math.nan)
            except (
                Exception
            ) as err:  # no nvidia-ml-py, no NVML, or a figure this GPU does not report
                log.info("no %s in the telemetry (%s: %s)", name, type(err).__name__, err)
                self._nvml.pop(name)
                out.append(math.nan)
        return out


def window_line(step: int, steps: int, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """A telemetry.jsonl line: every rank's values for the window of `steps` steps ending at `step`."""
    return {"step": step, "steps": steps, "time": round(time.time(), 3), "ranks": ranks}


def window_summary(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """The window in the metrics line: the slowest rank (the most busy time per step), the median rank's busy
    time (the lower middle one of an even count: with 2 ranks, the other one), the longest step and data wait."""
    slowest = max(ranks, key=lambda r: r["busy_ms"])
    return {
        "slowest_rank": slowest["rank"],
        "slowest_host": slowest["host"],
        "rank_busy_ms_max": slowest["busy_ms"],
        "rank_busy_ms_median": statistics.median_low(r["busy_ms"] for r in ranks),
        "rank_step_ms_max": max(r["step_ms"] for r in ranks),
        "data_wait_ms_max": max(r["data_ms"] for r in ranks),
    }


# ----------------------------------------------------------------------------- reading it back: stragglers


@dataclass(frozen=True)
class Straggler:
    rank: int
    host: str
    step: int
    busy_ms: float
    median_ms: float
    windows: int

    @property
    def message(self) -> str:
        return (
            f"rank {self.rank} on {self.host} is a straggler: {self.busy_ms:.0f} ms busy per step against the "
            f"median rank's {self.median_ms:.0f} ms (+{100 * (self.busy_ms / self.median_ms - 1):.0f}%) in "
            f"{self.windows} telemetry windows in a row, up to step {self.step}"
        )


class StragglerWatch:
    """A straggler: the same rank (on the same host) the slowest, with its busy time more than `margin` above the
    median rank's, in `windows` consecutive telemetry windows. Fed metrics lines in order; says so once per
    such stretch (again only after the rank has been within the margin, or another rank the slowest)."""

    def __init__(self, margin: float = 0.10, windows: int = 3):
        self.margin, self.windows = margin, windows
        self._who: tuple[int, str] | None = None
        self._count = 0
        self._said = False

    def feed(self, rows: Iterable[dict[str, Any]]) -> list[Straggler]:
        found = []
        for row in rows:
            if row.get("slowest_rank") is None or not row.get("rank_busy_ms_median"):
                continue  # not a window's end
            who = (int(row["slowest_rank"]), str(row.get("slowest_host", "?")))
            if row["rank_busy_ms_max"] <= row["rank_busy_ms_median"] * (1 + self.margin):
                self._who, self._count, self._said = None, 0, False
                continue
            if who != self._who:
                self._who, self._count, self._said = who, 0, False
            self._count += 1
            if self._count >= self.windows and not self._said:
                self._said = True
                found.append(
                    Straggler(
                        who[0],
                        who[1],
                        int(row["step"]),
                        float(row["rank_busy_ms_max"]),
                        float(row["rank_busy_ms_median"]),
                        self._count,
                    )
                )
        return found


def last_window(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The newest metrics line that ends a telemetry window."""
    return next((r for r in reversed(rows) if "slowest_rank" in r), None)
