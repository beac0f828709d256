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
from training.optim import Optimizer

log = logging.getLogger(__name__)

# Fields that may differ between the run that wrote a checkpoint and the one resuming it.
_MAY_CHANGE = {"train": {"stop_after_steps", "lease_ttl_s"}, "data": {"resume_on_other_data"}}


def check_compatible(saved: RunConfig, cfg: RunConfig) -> None:
    """Another model is an error; other changed sections are resumed with a warning."""
    if saved.model != cfg.model:
        raise ConfigError(
            f"run_dir holds a checkpoint of a different model ({saved.model} vs {cfg.model}); "
            "use a new run_dir"
        )
    changed = [
        k
        for k in ("data", "optim", "train")
        if getattr(saved, k).model_dump(exclude=_MAY_CHANGE.get(k))
        != getattr(cfg, k).model_dump(exclude=_MAY_CHANGE.get(k))
    ]
    if changed:
        log.warning(
            "resuming with changed config sections %s (bit-exact resume assumes none)", changed
        )


def check_same_data(ckpt: ck.Checkpoint, cfg: RunConfig, data_fingerprint: str) -> None:
    """The shards under data_url must be the ones the checkpoint was trained on (whatever their URL)."""
    saved = ckpt.train_state().data
    if "fingerprint" not in saved:
        log.warning(
            "%s does not record its training data (written by an earlier version): not checked",
            ckpt.url,
        )
    elif saved["fingerprint"] != data_fingerprint:
        msg = (
            f"{ckpt.url} was trained on other data ({saved.get('url')}, shards {saved['fingerprint']}) than "
            f"{cfg.data.data_url} holds now (shards {data_fingerprint}): resuming would silently change the "
            "token stream"
        )
        if not cfg.data.resume_on_other_data:
            raise ConfigError(
                msg + "; point data_url at its data, use a new run_dir, or set "
                "data.resume_on_other_data=true"
            )
        log.warning("%s (data.resume_on_other_data=true)", msg)


def refuse_unusable_history(run_dir: str) -> None:
    """Checkpoints that were complete but none of which loads (corrupt, unreadable): starting over at step 0
    would write over their history, so refuse. Incomplete ones (a write that never finished) are not history."""
    complete = ck.complete_steps(run_dir)
    if complete:
        steps = f"{complete[:5]}{'...' if len(complete) > 5 else ''}"
        raise ck.CheckpointError(
            f"{run_dir} holds {len(complete)} complete checkpoint(s) (steps {steps}) "
            "and none of them loads (see the warnings above): refusing to start over at step 0 on top of their "
            "history; repair them, move them aside, or use a new run_dir"
        )


def resume(
    cfg: RunConfig,
    model: torch.nn.Module,
    optimizer: Optimizer,
    loader: ShardLoader,
    device: torch.device,
    info: DistInfo,
    data_fingerprint: str,
) -> ck.Checkpoint | None:
    """Load the latest valid checkpoint into the model, optimizer, loader and RNGs; None for a fresh run."""
    latest = ck.latest_checkpoint(cfg.train.run_dir)
    if latest is None:
        refuse_unusable_history(cfg.train.run_dir)
        return None
    check_compatible(latest.config(), cfg)
    check_same_data(latest, cfg, data_fingerprint)
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
