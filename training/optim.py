"""The optimizers and LR schedules a run can choose (`optim.optimizer`, `optim.schedule`):

- build-nanogpt's: AdamW with decay on the >= 2-D tensors only (configure_optimizers), warmup + cosine;
- the fast recipe's: Muon (torch.optim.Muon: momentum orthogonalised by Newton-Schulz) for the blocks' 2-D
  weights, AdamW for the rest (embeddings, the head, biases, gains), each at its own learning rate, and a
  trapezoid schedule (warmup, a stable phase, a linear cool-down).

Either is one object to the step, the checkpoint and resume: `param_groups` (the step sets each group's lr as
the schedule's lr times the group's `lr_scale`, when it has one), `step`, `zero_grad`, `state_dict`,
`load_state_dict`.
"""

from __future__ import annotations

import inspect
import math
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from training.config import OptimConfig


class Optimizer(Protocol):
    @property
    def param_groups(self) -> list[dict[str, Any]]: ...

    def step(self) -> Any: ...

    def zero_grad(self, set_to_none: bool = True) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


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
    return _adamw(params, lr, weight_decay, betas, eps, device_type, fused)


def _adamw(params, lr, weight_decay, betas, eps, device_type, fused) -> torch.optim.AdamW:
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if fused is None:
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The 2-D weights of the transformer blocks (attention and MLP matmuls): what Muon optimises. Embeddings
    and the head are 2-D too, but are lookups and a classifier, not hidden maps: AdamW's."""
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    if blocks is None:
        return []
    return [p for p in blocks.parameters() if p.requires_grad and p.dim() == 2]


class MuonWithAdamW:
    """Muon for the hidden matrices, AdamW for every other parameter: one optimizer to the training loop."""

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.muon.param_groups + self.adamw.param_groups

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != {"muon", "adamw"}:
            raise ValueError(
                "the checkpoint's optimizer state is not Muon + AdamW: it was written by a run with another "
                "optim.optimizer"
            )
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])


def configure_muon(
    model: nn.Module,
    *,
    lr: float,
    muon_lr: float,
    weight_decay: float,
    muon_weight_decay: float,
    momentum: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    device_type: str = "cpu",
) -> MuonWithAdamW:
    """Muon (at `muon_lr`) for `hidden_matrices(model)`, AdamW (at `lr`, decay on the embeddings and head only)
    for the rest. The Muon group's `lr_scale` keeps the two rates in ratio under any schedule."""
    hidden = hidden_matrices(model)
    if not hidden:
        raise ValueError("Muon needs 2-D hidden weights, and this model has none")
    ids = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    muon = torch.optim.Muon(
        [{"params": hidden, "lr_scale": muon_lr / lr}],
        lr=muon_lr,
        weight_decay=muon_weight_decay,
        momentum=momentum,
    )
    adamw = _adamw(rest, lr, weight_decay, betas, eps, device_type, None)
    return MuonWithAdamW(muon, adamw)


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


def trapezoid_lr(
    step: int,
    *,
    max_lr: float,
    min_lr: float,
    warmup_steps: int,
    max_steps: int,
    cooldown_frac: float,
) -> float:
    """Linear warmup to max_lr, max_lr held, then a linear cool-down to min_lr over the last `cooldown_frac`
    of max_steps (warmup-stable-decay: a run can be stopped and cooled down at any point of its stable phase)."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    start = max(warmup_steps, max_steps - round(cooldown_frac * max_steps))
    if step < start:
        return max_lr
    ratio = (step - start) / max(1, max_steps - start)
    return max_lr + (min_lr - max_lr) * ratio


def build_optimizer(model: nn.Module, o: OptimConfig, device_type: str) -> Optimizer:
    """The run's optimizer, as `o.optimizer` says."""
    betas = (o.beta1, o.beta2)
    if o.optimizer == "muon":
        return configure_muon(
            model,
            lr=o.max_lr,
            muon_lr=o.muon_lr,
            weight_decay=o.weight_decay,
            muon_weight_decay=o.muon_weight_decay,
            momentum=o.muon_momentum,
            betas=betas,
            eps=o.eps,
            device_type=device_type,
        )
    return configure_optimizer(
        model,
        lr=o.max_lr,
        weight_decay=o.weight_decay,
        betas=betas,
        eps=o.eps,
        device_type=device_type,
    )


def lr_at(step: int, o: OptimConfig, max_steps: int) -> float:
    """The schedule's learning rate at `step` (AdamW's; Muon's is it times its group's lr_scale)."""
    lo = o.max_lr * o.min_lr_ratio
    if o.schedule == "trapezoid":
        return trapezoid_lr(
            step,
            max_lr=o.max_lr,
            min_lr=lo,
            warmup_steps=o.warmup_steps,
            max_steps=max_steps,
            cooldown_frac=o.cooldown_frac,
        )
    return cosine_lr(
        step, max_lr=o.max_lr, min_lr=lo, warmup_steps=o.warmup_steps, max_steps=max_steps
    )
