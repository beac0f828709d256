"""When the training loop checkpoints and what happens around it, decided here rather than in the loop:
every `checkpoint.checkpoint_every` steps, at the last step, and when the run stops early (a signal or
`stop_after_steps`). Every rank writes its own state collectively (training/checkpoint.py); after each
checkpoint rank 0 prunes old ones and flushes the metrics, and all ranks leave together."""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from training import checkpoint as ck
from training import distributed
from training.config import RunConfig
from training.distributed import DistInfo
from training.loader import ShardLoader

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, cfg: RunConfig, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 loader: ShardLoader, device: torch.device, info: DistInfo,
                 data: dict[str, str], extra_state: Callable[[], dict[str, Any]] = dict,
                 after_save: Callable[[], None] | None = None, latest: str | None = None):
        """`data`: what the checkpoint records of its training data ({"url", "fingerprint"}); `extra_state`: more
        of the loop's state for train_state.json (the guard's history, the position in the token stream)."""
        self.cfg, self.model, self.optimizer, self.loader = cfg, model, optimizer, loader
        self.device, self.info, self.data, self.after_save = device, info, data, after_save
        self.extra_state = extra_state
        self.latest = latest  # URL of the newest checkpoint of this run (the one resumed from, at first)

    def due(self, step: int, stopping: bool) -> bool:
        """Whether the state after `step` steps is to be saved."""
        return stopping or step == self.cfg.train.max_steps or step % self.cfg.checkpoint.checkpoint_every == 0

    def save_if_due(self, step: int, stopping: bool = False) -> str | None:
        return self.save(step) if self.due(step, stopping) else None

    def save(self, step: int) -> str | None:
        """Write the checkpoint of `step` on every rank; its URL on rank 0."""
        c = self.cfg
        url = ck.write_checkpoint(
            c.train.run_dir, step, model=self.model, optimizer=self.optimizer, config=c,
            rank_state={"loader": self.loader.state_dict(), "rng": ck.rng_state(self.device)},
            rank=self.info.rank, world_size=self.info.world_size, gather=distributed.gather_to_master,
            train_state={"tokens_seen": step * c.train.total_batch_tokens, "data": self.data, **self.extra_state()})
        if self.info.is_master:
            ck.prune(c.train.run_dir, c.checkpoint.keep_last, c.checkpoint.keep_every, step)
            if self.after_save is not None:
                self.after_save()
            log.info("checkpoint %s", url)
            self.latest = url
        distributed.barrier()
        return url
