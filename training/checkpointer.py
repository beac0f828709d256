"""When the training loop checkpoints and what happens around it, decided here rather than in the loop:
every `checkpoint.checkpoint_every` steps, at the last step, and when the run stops early (a signal or
`stop_after_steps`). Every rank takes its state collectively (training/checkpoint.py: a snapshot in host
memory, so that training can go on); a thread of each rank writes it while the next steps run, at most one
write in flight (`checkpoint.async_write`; off, every rank waits for the write and all leave together). The
last step and an early stop wait for their write. Once the manifest is written, rank 0 prunes old
checkpoints. What each checkpoint cost the loop (`ckpt_block_s`) and the write (`ckpt_write_s`) go into the
next metrics lines."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from common.errors import ReproError
from training import checkpoint as ck
from training import distributed
from training.config import RunConfig
from training.distributed import DistInfo
from training.loader import ShardLoader
from training.optim import Optimizer

log = logging.getLogger(__name__)


class CheckpointWriteFailed(ReproError):
    """A checkpoint written in the background failed; raised at the next checkpoint or at the end of the run."""


class Checkpointer:
    def __init__(
        self,
        cfg: RunConfig,
        *,
        model: torch.nn.Module,
        optimizer: Optimizer,
        loader: ShardLoader,
        device: torch.device,
        info: DistInfo,
        data: dict[str, str],
        extra_state: Callable[[], dict[str, Any]] = dict,
        after_save: Callable[[], None] | None = None,
        latest: str | None = None,
    ):
        """`data`: what the checkpoint records of its training data ({"url", "fingerprint"}); `extra_state`: more
        of the loop's state for train_state.json (the guard's history, the position in the token stream)."""
        self.cfg, self.model, self.optimizer, self.loader = cfg, model, optimizer, loader
        self.device, self.info, self.data, self.after_save = device, info, data, after_save
        self.extra_state = extra_state
        self.latest = latest  # URL of the newest complete checkpoint of this run (the one resumed from, at first)
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None
        self._block_s: float | None = None  # reported once, in the next metrics line
        self._write_s: float | None = None  # set by the writer thread

    def due(self, step: int, stopping: bool) -> bool:
        """Whether the state after `step` steps is to be saved."""
        return (
            stopping
            or step == self.cfg.train.max_steps
            or step % self.cfg.checkpoint.checkpoint_every == 0
        )

    def save_if_due(self, step: int, stopping: bool = False) -> None:
        if self.due(step, stopping):
            self.save(step, wait=stopping or step == self.cfg.train.max_steps)

    def save(self, step: int, wait: bool = False) -> None:
        """Take the checkpoint of `step` on every rank and write it, in the background unless `wait` (the
        process is about to leave) or `checkpoint.async_write` is off."""
        c, t0 = self.cfg, time.perf_counter()
        self.wait()  # one write in flight: the previous one is done (or its failure raised) first
        snap = ck.snapshot_checkpoint(
            c.train.run_dir,
            step,
            model=self.model,
            optimizer=self.optimizer,
            config=c,
            rank_state={"loader": self.loader.state_dict(), "rng": ck.rng_state(self.device)},
            rank=self.info.rank,
            world_size=self.info.world_size,
            gather=distributed.gather_to_master,
            train_state={
                "tokens_seen": step * c.train.total_batch_tokens,
                "data": self.data,
                **self.extra_state(),
            },
        )
        if self.info.is_master and self.after_save is not None:
            self.after_save()  # the metrics up to this step are on the store no later than the checkpoint
        if c.checkpoint.async_write and not wait:
            self._writer = threading.Thread(
                target=self._write, args=(snap, t0), name="checkpoint-writer", daemon=True
            )
            self._writer.start()
        else:
            self._write(snap, t0)
            self.wait()
            distributed.barrier()
        self._block_s = round(time.perf_counter() - t0, 4)

    def _write(self, snap: ck.Snapshot, t0: float) -> None:
        try:
            url = snap.write(wait_s=self.cfg.train.collective_timeout_s)
            if url is not None:
                c = self.cfg
                ck.prune(
                    c.train.run_dir, c.checkpoint.keep_last, c.checkpoint.keep_every, snap.step
                )
                log.info("checkpoint %s", url)
                self.latest = url
            self._write_s = round(time.perf_counter() - t0, 4)
        except BaseException as err:  # raised by the training loop's thread, at the next wait()
            self._error = err

    def wait(self) -> None:
        """Until the write in flight is done; a failed one raises here."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._error is not None:
            err, self._error = self._error, None
            raise CheckpointWriteFailed(f"writing a checkpoint failed: {err}") from err

    def close(self) -> None:
        """Wait for the write in flight without raising (the run is ending on another error already)."""
        try:
            self.wait()
        except CheckpointWriteFailed as err:
            log.error("%s", err)

    def timings(self) -> dict[str, float]:
        """The last checkpoint's costs not yet reported, for the next metrics line."""
        out = {}
        if self._block_s is not None:
            out["ckpt_block_s"], self._block_s = self._block_s, None
        if self._write_s is not None:
            out["ckpt_write_s"], self._write_s = self._write_s, None
        return out
