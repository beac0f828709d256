"""Faults injected on purpose (the config's `debug` section, a testing aid): a real NaN or a real spike through
the whole step (forward, backward, clipping), and a real death of the training processes, so that the guard,
the rollback, the flow's resubmission and a sweep are tried on a run as it would meet them, not on a simulated
return value."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable

from common import store
from common.layout import RunDir
from training.config import DebugConfig, parse_range

log = logging.getLogger(__name__)


class Poison:
    def __init__(self, cfg: DebugConfig):
        self.cfg = cfg
        self.batches = [parse_range(r) for r in cfg.fault_batches]

    def loss_scale(self, step: int, batch: int) -> float:
        """1.0, or the poison of a step chosen by debug.fault_steps / debug.fault_batches."""
        if step in self.cfg.fault_steps or any(r.holds(batch) for r in self.batches):
            return float("nan") if self.cfg.fault == "nan" else 1000.0
        return 1.0


class Death:
    """`debug.die_at_step`: the process kills itself at that step, as a node that fails takes it (no checkpoint,
    no flush, no exit code of its own). Once per run directory: whether it is due is read when the process
    starts, and rank 0 leaves a marker before it dies, so the submission that resumes goes past the step.

    A checkpoint still being written in the background is let land first, so that where the resubmission
    resumes from is fixed by the config, not by how fast the store was that time (a death in the middle of a
    write is a different fault, which the checkpoint's manifest already covers)."""

    def __init__(self, cfg: DebugConfig, run: RunDir, is_master: bool):
        self.marker = run.fault_marker(f"died-at-step-{cfg.die_at_step}")
        due = cfg.die_at_step is not None and not store.exists(self.marker)
        self.step = cfg.die_at_step if due else None
        self.is_master = is_master

    def at(self, step: int, settle: Callable[[], None]) -> None:
        """Die here if `step` is the one; `settle` first waits for the writes in flight."""
        if step != self.step:
            return
        settle()
        if self.is_master:
            store.write_json(self.marker, {"step": step, "time": time.time(), "pid": os.getpid()})
        log.warning("debug.die_at_step: killed at step %d, as a failing node would be", step)
        os.kill(os.getpid(), signal.SIGKILL)
