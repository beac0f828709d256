"""Resuming a run from the latest valid checkpoint of its run directory: the weights, the optimizer, the
loader's position in the token stream and, on the same world size, every rank's RNG state, so the loss trace
continues bit-exactly. On another world size the token stream continues where it stopped."""

from __future__ import annotations

import logging

import torch

from training import checkpoint as ck
from training.config import ConfigError, RunConfig
from training.distributed import DistInfo
from training.loader import ShardLoader

log = logging.getLogger(__name__)

# Fields that may differ between the run that wrote a checkpoint and the one resuming it.
_MAY_CHANGE = {"train": {"stop_after_steps"}}


def check_compatible(saved: RunConfig, cfg: RunConfig) -> None:
    """Another model is an error; other changed sections are resumed with a warning."""
    if saved.model != cfg.model:
        raise ConfigError(f"run_dir holds a checkpoint of a different model ({saved.model} vs {cfg.model}); "
                          "use a new run_dir")
    changed = [k for k in ("data", "optim", "train")
               if getattr(saved, k).model_dump(exclude=_MAY_CHANGE.get(k)) != getattr(cfg, k).model_dump(exclude=_MAY_CHANGE.get(k))]
    if changed:
        log.warning("resuming with changed config sections %s (bit-exact resume assumes none)", changed)


def resume(cfg: RunConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: ShardLoader,
           device: torch.device, info: DistInfo) -> ck.Checkpoint | None:
    """Load the latest valid checkpoint into the model, optimizer, loader and RNGs; None for a fresh run."""
    latest = ck.latest_checkpoint(cfg.train.run_dir)
    if latest is None:
        return None
    check_compatible(latest.config(), cfg)
    ck.load_model_state(model, latest.model_state_bytes())
    optimizer.load_state_dict(latest.optimizer_state())
    if latest.world_size == info.world_size:
        rank_state = latest.rank_state(info.rank)
        ck.set_rng_state(rank_state["rng"], device)
    else:
        # Elastic resume: the token stream continues where it stopped; the loss trace is no longer bit-exact.
        rank_state = latest.rank_state(0)
        log.warning("resuming a %d-rank checkpoint on %d ranks", latest.world_size, info.world_size)
    loader.load_state_dict(rank_state["loader"])
    if info.is_master:
        log.info("resumed from %s (step %d)", latest.url, latest.step)
    return latest
