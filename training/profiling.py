"""`train.profile_steps = "A:B"`: a torch.profiler trace of steps A to B-1 on every rank, written into the run
directory (Chrome trace JSON, for Perfetto or chrome://tracing) so that a slow step can be looked at where it
ran, on the run's own data and world size. Only the optimizer steps are traced, not validation or checkpoints."""

from __future__ import annotations

import logging
import os
import tempfile

import torch

from common import store
from common.layout import RunDir
from training.config import parse_range

log = logging.getLogger(__name__)


class StepProfiler:
    def __init__(self, spec: str | None, run: RunDir, rank: int, device: torch.device):
        self.range = parse_range(spec) if spec else None
        self.run, self.rank, self.device = run, rank, device
        self._prof: torch.profiler.profile | None = None

    def before(self, step: int) -> None:
        if self.range and step == self.range[0]:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=activities)
            self._prof.__enter__()
        if self._prof is not None:  # each step a named span in the trace
            self._span = torch.profiler.record_function(f"train step {step}")
            self._span.__enter__()

    def after(self, step: int) -> None:
        if self._prof is None:
            return
        self._span.__exit__(None, None, None)
        if self.range is not None and step + 1 >= self.range.stop:
            self.close(step + 1)

    def close(self, stopped_at: int) -> None:
        """Ends the trace (also early: a run stopped inside the range keeps what it traced) and writes it."""
        if self._prof is None:
            return
        prof, self._prof = self._prof, None
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        prof.__exit__(None, None, None)
        assert self.range is not None  # a trace is only ever started inside the range
        start, stop = self.range.start, min(self.range.stop, stopped_at)
        url = self.run.profile(start, stop, self.rank)
        # export_chrome_trace writes a local file; the store may be object storage
        fd, path = tempfile.mkstemp(suffix=".json")
        os.close(fd)
        try:
            prof.export_chrome_trace(path)
            with open(path, "rb") as f:
                store.write_bytes(url, f.read())
        finally:
            os.unlink(path)
        log.info("profile of steps %d..%d written: %s", start, stop - 1, url)
