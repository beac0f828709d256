"""The per-step guard: after a step's backward pass, before its update, it decides whether the update is
applied. A non-finite loss or gradient norm, or one far above its recent history (a z-score over a rolling
window, as llm.c skips updates), skips the update: the batch is consumed, the step counted, no weight moves.
Several skips within a window mean the run has diverged: the job ends with exit code 3, and the flow rolls back
to the last checkpoint before the trouble, skipping the offending data (flows/resubmission.py).

Every rank sees the same loss (averaged over ranks) and the same gradient norm (of the synced gradients), so
every rank decides the same. The history is part of the checkpoint, so a resumed run decides exactly as an
uninterrupted one would.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from training.config import GuardConfig, parse_range


class StepGuard:
    def __init__(self, cfg: GuardConfig):
        self.cfg = cfg
        self.losses: deque[float] = deque(maxlen=cfg.zscore_window)  # of applied steps only
        self.norms: deque[float] = deque(maxlen=cfg.zscore_window)
        self.skips: list[
            dict[str, Any]
        ] = []  # {"step", "batch", "reason"} of the last skip_window steps
        self._fault_batches = [parse_range(r) for r in cfg.fault_batches]

    # ----------------------------------------------------------------------------- faults (a testing aid)

    def loss_scale(self, step: int, batch: int) -> float:
        """1.0, or the poison of a step chosen by guard.fault_steps / guard.fault_batches."""
        if step in self.cfg.fault_steps or any(a <= batch < b for a, b in self._fault_batches):
            return float("nan") if self.cfg.fault == "nan" else 1000.0
        return 1.0

    # ----------------------------------------------------------------------------- the decision

    def _zscore(self, history: deque[float], value: float) -> float:
        if len(history) < 2:
            return 0.0
        mean = sum(history) / len(history)
        std = math.sqrt(sum((h - mean) ** 2 for h in history) / (len(history) - 1))
        return (value - mean) / std if std > 0 else 0.0

    def check(self, step: int, batch: int, loss: float, norm: float) -> str | None:
        """The reason to skip this step's update, or None to apply it (and learn from it)."""
        c, reason = self.cfg, None
        if not (math.isfinite(loss) and math.isfinite(norm)):
            reason = f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'}"
            if not c.skip_nonfinite:
                raise FloatingPointError(
                    f"{reason} at step {step}; stopping (latest checkpoint is intact)"
                )
        elif c.zscore and step >= c.zscore_warmup and len(self.losses) >= 10:
            z_loss, z_norm = self._zscore(self.losses, loss), self._zscore(self.norms, norm)
            if max(z_loss, z_norm) > c.zscore:
                reason = (
                    f"loss spike (z {z_loss:.1f})"
                    if z_loss >= z_norm
                    else f"gradient norm spike (z {z_norm:.1f})"
                )
        self.skips = [s for s in self.skips if s["step"] > step - c.skip_window]
        if reason is None:
            self.losses.append(loss)
            self.norms.append(norm)
        else:
            self.skips.append({"step": step, "batch": batch, "reason": reason})
        return reason

    def diverged(self) -> dict[str, Any] | None:
        """When the skips of the window reach max_skips: their steps and the batches to pass over."""
        if len(self.skips) < self.cfg.max_skips:
            return None
        first, last = self.skips[0], self.skips[-1]
        return {
            "steps": [first["step"], last["step"]],
            "batches": f"{first['batch']}:{last['batch'] + 1}",
            "reasons": sorted({s["reason"].split(" (")[0] for s in self.skips}),
        }

    # ----------------------------------------------------------------------------- checkpointed state

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "norms": list(self.norms), "skips": list(self.skips)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses.extend(state.get("losses", []))
        self.norms.extend(state.get("norms", []))
        self.skips = list(state.get("skips", []))
