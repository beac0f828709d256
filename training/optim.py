"""AdamW with decay groups (build-nanogpt's configure_optimizers) and the warmup + cosine LR schedule."""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn as nn


def configure_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    device_type: str = "cpu",
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW with decay on >= 2-D tensors (matmul weights, embeddings) and none on biases and LayerNorms."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied tensor appears once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if fused is None:
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def cosine_lr(
    step: int, *, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int
) -> float:
    """Linear warmup to max_lr, then cosine decay to min_lr at max_steps (build-nanogpt's get_lr)."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    ratio = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)
