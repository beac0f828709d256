"""One optimizer step: gradient accumulation over micro-batches, DDP sync on the last one only, grad-norm
clipping, the LR for this step, AdamW. Shared by the training loop and the throughput benchmark."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch

from training import distributed

Batch = tuple[torch.Tensor, torch.Tensor]


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    next_batch: Callable[[], Batch],
    *,
    grad_accum: int,
    device: torch.device,
    lr: float,
    grad_clip: float,
    autocast_dtype: torch.dtype | None = None,
    ddp: bool = False,
    loss_chunk: int = 0,
    loss_scale: float = 1.0,
    apply: Callable[[torch.Tensor, torch.Tensor], bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss averaged over micro-steps and ranks, global grad norm before clipping), both on device.
    `apply(loss, norm)` decides, before the optimizer moves, whether this step's update is applied (the guard);
    `loss_scale` poisons the step (a testing aid of the guard)."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss_accum = torch.zeros((), device=device)
    for micro in range(grad_accum):
        x, y = next_batch()
        x = x.to(device, non_blocking=True).long()  # uint16 over the wire, widened on the device
        y = y.to(device, non_blocking=True).long()
        last = micro == grad_accum - 1
        with model.no_sync() if ddp and not last else nullcontext():
            with (
                torch.autocast(device.type, dtype=autocast_dtype)
                if autocast_dtype
                else nullcontext()
            ):
                _, loss = model(x, y, loss_chunk=loss_chunk) if loss_chunk else model(x, y)
            loss = loss / grad_accum  # the gradient of the mean over the whole batch
            if loss_scale != 1.0:
                loss = loss * loss_scale
            loss_accum += loss.detach()
            loss.backward()
    distributed.mean(loss_accum)
    params = [p for p in model.parameters() if p.grad is not None]
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    if apply is not None and not apply(loss_accum, norm):
        optimizer.zero_grad(set_to_none=True)  # skipped: no weight and no optimizer state moves
        return loss_accum, norm
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return loss_accum, norm
