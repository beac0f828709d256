"""One optimizer step: gradient accumulation over micro-batches, DDP sync on the last one only, grad-norm
clipping, then the update at this step's LR, unless the judge (the guard) says to skip it. Shared by the
training loop and the throughput benchmark."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from training import distributed
from training.optim import Optimizer

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class StepSetup:
    """What every step of a run shares: the model as the step calls it (compiled, under DDP), its optimizer,
    where its micro-batches come from, and how they are computed."""

    model: torch.nn.Module
    optimizer: Optimizer
    next_batch: Callable[[], Batch]
    grad_accum: int
    device: torch.device
    grad_clip: float
    autocast_dtype: torch.dtype | None = None
    ddp: bool = False
    loss_chunk: int = 0


@dataclass(frozen=True)
class StepResult:
    loss: torch.Tensor  # averaged over micro-steps and ranks, on the device
    norm: torch.Tensor  # the global gradient norm before clipping, on the device
    skipped: str | None = None  # why the update was not applied (the judge's verdict), else None


def train_step(
    s: StepSetup,
    lr: float,
    judge: Callable[[float, float], str | None] | None = None,
    loss_scale: float = 1.0,
    micro_steps: int | None = None,
) -> StepResult:
    """One step at `lr`. `judge(loss, norm)` sees the step's loss and gradient norm before the optimizer moves
    and returns a reason to skip its update, or None to apply it. `loss_scale` poisons the step on purpose
    (the `debug` section's faults); 1.0 otherwise."""
    loss, norm = _gradients(s, loss_scale, micro_steps or s.grad_accum)
    skipped = judge(loss.item(), norm.item()) if judge is not None else None
    if skipped is not None:
        s.optimizer.zero_grad(set_to_none=True)  # no weight and no optimizer state moves
        return StepResult(loss, norm, skipped)
    for group in s.optimizer.param_groups:
        # a group with its own rate (Muon's) keeps it in ratio to the schedule's
        group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr
    s.optimizer.step()
    return StepResult(loss, norm)


def _gradients(
    s: StepSetup, loss_scale: float, micro_steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The accumulated gradients of one step's micro-batches (clipped), its loss and gradient norm."""
    s.model.train()
    s.optimizer.zero_grad(set_to_none=True)
    loss_accum = torch.zeros((), device=s.device)
    for micro in range(micro_steps):
        x, y = s.next_batch()
        x = x.to(s.device, non_blocking=True).long()  # uint16 over the wire, widened on the device
        y = y.to(s.device, non_blocking=True).long()
        last = micro == micro_steps - 1
        with s.model.no_sync() if s.ddp and not last else nullcontext():  # type: ignore[operator]
            amp = s.autocast_dtype
            with torch.autocast(s.device.type, dtype=amp) if amp else nullcontext():
                _, loss = s.model(x, y, loss_chunk=s.loss_chunk) if s.loss_chunk else s.model(x, y)
            loss = loss / micro_steps  # the gradient of the mean over the whole batch
            if loss_scale != 1.0:
                loss = loss * loss_scale
            loss_accum += loss.detach()
            loss.backward()
    distributed.mean(loss_accum)
    params = [p for p in s.model.parameters() if p.grad is not None]
    if s.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))  # type: ignore[union-attr]
    return loss_accum, norm
