"""The per-step guard: after a step's backward pass, before its update, it decides whether the update is
applied. A non-finite loss or gradient norm, or one far above its recent history (a z-score over a rolling
window, as llm.c skips updates), skips the update: the batch is consumed, the step counted, no weight moves.
Several skips within a window mean the run has diverged: the job ends with exit code 3, and the flow rolls back
to the last checkpoint before the trouble, skipping the offending data (cluster/resubmission.py).

Every rank sees the same loss (averaged over ranks) and the same gradient norm (of the synced gradients), so
every rank decides the same. The history is part of the checkpoint, so a resumed run decides exactly as an
uninterrupted one would.
"""

from __future__ import annotations

import math
import re
from collections import deque
from dataclasses import dataclass
from typing import Any

from training.config import GuardConfig, Span, parse_range


@dataclass(frozen=True)
class Divergence:
    """The guard's verdict on a run that keeps skipping: the skipped steps (first, last), the data batches
    they read (to pass over on the rollback), and why they were skipped. On disk (result.json, events.jsonl,
    submissions.jsonl) it is {"steps": [first, last], "batches": "start:stop", "reasons": [...]}."""

    steps: tuple[int, int]
    batches: Span
    reasons: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "steps": list(self.steps),
            "batches": str(self.batches),
            "reasons": list(self.reasons),
        }

    @classmethod
    def from_json(cls, obj: Any) -> Divergence:
        """The verdict from its JSON form; ValueError naming what is wrong with it."""
        if not isinstance(obj, dict):
            raise ValueError(f"a divergence verdict is a JSON object, not {obj!r}")
        steps, batches, reasons = obj.get("steps"), obj.get("batches"), obj.get("reasons", [])
        if not (
            isinstance(steps, list)
            and len(steps) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in steps)
        ):
            raise ValueError(f"a divergence verdict's steps are [first, last], not {steps!r}")
        if not isinstance(batches, str) or not re.fullmatch(r"\d+:\d+", batches):
            raise ValueError(f"a divergence verdict's batches are 'start:stop', not {batches!r}")
        if not (isinstance(reasons, list) and all(isinstance(r, str) for r in reasons)):
            raise ValueError(f"a divergence verdict's reasons are strings, not {reasons!r}")
        return cls((steps[0], steps[1]), parse_range(batches), tuple(reasons))

    def describe(self) -> str:
        return f"steps {list(self.steps)} (data batches {self.batches}: {', '.join(self.reasons)})"


class StepGuard:
    def __init__(self, cfg: GuardConfig):
        self.cfg = cfg
        self.losses: deque[float] = deque(maxlen=cfg.zscore_window)  # of applied steps only
        self.norms: deque[float] = deque(maxlen=cfg.zscore_window)
        # {"step", "batch", "reason"} of the skips within the last skip_window steps
        self.skips: list[dict[str, Any]] = []

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

    def diverged(self) -> Divergence | None:
        """When the skips of the window reach max_skips: the verdict (their steps, the batches to pass over)."""
        if len(self.skips) < self.cfg.max_skips:
            return None
        first, last = self.skips[0], self.skips[-1]
        return Divergence(
            (first["step"], last["step"]),
            Span(first["batch"], last["batch"] + 1),
            tuple(sorted({s["reason"].split(" (")[0] for s in self.skips})),
        )

    # ----------------------------------------------------------------------------- checkpointed state

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "norms": list(self.norms), "skips": list(self.skips)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses.extend(state.get("losses", []))
        self.norms.extend(state.get("norms", []))
        self.skips = list(state.get("skips", []))
