"""Faults injected on purpose (the config's `debug` section, a testing aid): a real NaN or a real spike through
the whole step (forward, backward, clipping), so that the guard, the rollback and the flow are tried on a run
as it would meet them, not on a simulated return value."""

from __future__ import annotations

from training.config import DebugConfig, parse_range


class Poison:
    def __init__(self, cfg: DebugConfig):
        self.cfg = cfg
        self.batches = [parse_range(r) for r in cfg.fault_batches]

    def loss_scale(self, step: int, batch: int) -> float:
        """1.0, or the poison of a step chosen by debug.fault_steps / debug.fault_batches."""
        if step in self.cfg.fault_steps or any(r.holds(batch) for r in self.batches):
            return float("nan") if self.cfg.fault == "nan" else 1000.0
        return 1.0
