"""The training job: one process, or one per GPU under torchrun (any --nnodes / --nproc_per_node).

    python -m training.train --config configs/<preset>.toml [--set key=value ...]
    torchrun --nproc_per_node 8 -m training.train --config gpt2-124m --set run_dir=s3://bucket/runs/x

Resumes automatically from the latest valid checkpoint in `run_dir`, bit-exactly on the same world size.
On SIGUSR2 or SIGTERM (Slurm's warning before preemption or the time limit) or Ctrl-C, every rank finishes
its step, a checkpoint is written collectively, and the process exits with exit_codes.REQUEUE (75).

Reading order: `Trainer.__init__` (set-up: preflight, build, resume, wrap), then `Trainer.run` (the loop);
the step itself is training/step.py, checkpoint cadence training/checkpointer.py.
"""

# ruff: noqa: E402 (the stop signal is caught before the imports below, which take seconds)
from __future__ import annotations

if (
    __name__ == "__main__"
):  # python -m training.train: a stop signal during start-up is kept, not fatal
    from training import stop_signal as _stop_signal

    _stop_signal.install()

import argparse
import json
import logging
import os
import random
import re
import sys
import time
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from common import exit_codes, store
from common.cli import entry_point
from common.errors import ReproError, StopRequested
from common.heartbeat import HeartbeatWriter, laggards, read_heartbeats
from common.layout import RunDir
from common.lease import Lease, LeaseHeld
from common.logfiles import LogFile, LogFiles
from common.shards import data_fingerprint
from training import accel, distributed, stop_signal
from training.checkpoint import TrainState
from training.checkpointer import Checkpointer
from training.config import ConfigError, RunConfig, TrainConfig, load_config, parse_range
from training.distributed import DistInfo
from training.faults import Death, Poison
from training.guard import StepGuard
from training.loader import ShardLoader
from training.metrics import MetricsLog, console_line, line_step, peak_flops
from training.model import GPT, flops_per_token
from training.optim import Optimizer, build_optimizer, lr_at
from training.preflight import preflight
from training.profiling import StepProfiler
from training.resume import resume
from training.step import StepResult, StepSetup, train_step
from training.telemetry import RankTelemetry, window_line, window_summary

log = logging.getLogger("training")


# ----------------------------------------------------------------------------- set-up


def check_kernels(cfg: RunConfig, device: torch.device) -> None:
    """A kernel switch that cannot run on this device is one line before anything is built."""
    from training.kernels import available

    for switch in ("fused_add_layernorm", "fused_classifier"):
        why = available(device) if getattr(cfg.train, switch) else None
        if why is not None:
            raise ConfigError(f"train.{switch}: {why}")
    if cfg.train.attention == "fa4":
        from training.kernels import flash_attention4

        why = flash_attention4.available(device)
        if why is not None:
            raise ConfigError(f"train.attention=fa4: {why}")


def build_model(cfg: RunConfig, device: torch.device) -> tuple[GPT, Optimizer]:
    # Same seed on every rank: identical initial weights (DDP also broadcasts them).
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model).to(device)
    model.fused_add_layernorm = cfg.train.fused_add_layernorm
    model.fused_classifier = cfg.train.fused_classifier
    model.use_flash_attention4(cfg.train.attention == "fa4")
    return model, build_optimizer(model, cfg.optim, device.type)


def build_loaders(cfg: RunConfig, info: DistInfo) -> tuple[ShardLoader, ShardLoader]:
    t, d = cfg.train, cfg.data
    train = ShardLoader(
        d.url,
        "train",
        t.micro_batch,
        t.seq_len,
        info.rank,
        info.world_size,
        shuffle=d.shuffle,
        seed=t.seed,
        verify=d.verify_checksums,
        vocab_size=cfg.model.vocab_size,
        align_docs=d.align_docs,
        step_rows=t.total_batch_tokens // t.seq_len,
    )
    val = ShardLoader(  # plain rows always: every recipe's val loss is measured on the same tokens
        d.url,
        "val",
        t.micro_batch,
        t.seq_len,
        info.rank,
        info.world_size,
        verify=d.verify_checksums,
        vocab_size=cfg.model.vocab_size,
    )
    return train, val


def wrap(model: GPT, t: TrainConfig, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """What the step calls: the model compiled (train.compile) and under DDP (several ranks)."""
    step_model: torch.nn.Module = model
    if t.compile:
        mode = None if t.compile_mode == "default" else t.compile_mode
        step_model = torch.compile(step_model, mode=mode)  # type: ignore[assignment]
    if info.enabled:
        step_model = DDP(
            step_model, device_ids=[info.local_rank] if device.type == "cuda" else None
        )
    return step_model


# ----------------------------------------------------------------------------- the job


def train(cfg: RunConfig, force: bool = False) -> dict[str, Any]:
    """`force`: train into a run directory that holds files the project did not write."""
    device = accel.resolve_device(cfg)
    info = distributed.init(device.type, cfg.train.collective_timeout_s, cfg.train.run_dir)
    heartbeat = HeartbeatWriter(
        RunDir(cfg.train.run_dir), info.rank, info.world_size, cfg.train.heartbeat_seconds
    )
    patience = store.OutagePatience()  # started once the run directory is ours (Trainer)
    try:
        return Trainer(cfg, device, info, heartbeat, force, patience).run()
    except RuntimeError as err:
        if info.enabled and distributed.is_timeout(err):
            raise distributed.CollectiveTimeout(timeout_report(cfg, info, heartbeat, err)) from None
        raise
    finally:
        patience.stop()
        heartbeat.stop()
        distributed.shutdown()


def timeout_report(
    cfg: RunConfig, info: DistInfo, heartbeat: HeartbeatWriter, err: BaseException
) -> str:
    """One line for a collective that timed out on this rank: where it was, and which ranks had not arrived
    according to their heartbeats (the rank that waited is rarely the one at fault)."""
    me, hb = heartbeat.record, cfg.train.heartbeat_seconds
    cause = re.sub(r"^\[[^\]]*\]\s*", "", str(err).splitlines()[0])[
        :160
    ]  # without gloo's source location
    if hb > 0:
        late = laggards(
            read_heartbeats(RunDir(cfg.train.run_dir)),
            info.world_size,
            me["step"],
            stale_s=max(2 * hb, min(3 * hb + 5, cfg.train.collective_timeout_s / 2)),
        )
        who = (
            f"ranks that had not arrived: {'; '.join(late)}"
            if late
            else "every rank beating at the same step (a network fault, or ranks in different collectives)"
        )
    else:
        who = "no heartbeats (train.heartbeat_seconds=0) to tell which rank is late"
    return (
        f"a collective timed out after {cfg.train.collective_timeout_s:g} s on rank {info.rank} "
        f"({me['host']}) at step {me['step']} ({me['phase']}); {who} ({cause})"
    )


class LeaseLost(ReproError):
    """Another writer took the run directory over while this run was training; nothing more is written."""


def take_run_dir(cfg: RunConfig, info: DistInfo, device: torch.device) -> Lease | None:
    """Rank 0 takes the run directory's writer lease (common/lease.py); every rank stops if it cannot."""
    lease, refused = None, None
    if info.is_master:
        job = os.environ.get("SLURM_JOB_ID", "")
        lease = Lease(
            RunDir(cfg.train.run_dir).lease("trainer"),
            f"trainer{f', Slurm job {job}' if job else ''}",
            identity=f"slurm-{job}" if job else "",
            ttl_s=cfg.train.lease_ttl_s,
        )
        try:
            lease.acquire(should_stop=stop_signal.received)
        except (LeaseHeld, StopRequested) as err:
            refused = err
    # every rank ends alike: 2 a stop asked for while rank 0 waited (exit 75), 1 held by another (exit 2)
    why = 0 if refused is None else 2 if isinstance(refused, StopRequested) else 1
    verdict = distributed.max_over_ranks(why, device)
    if verdict == 2:
        raise refused or StopRequested(
            f"stopped while rank 0 waited for the lease of {cfg.train.run_dir}"
        )
    if verdict == 1:
        raise refused or LeaseHeld(f"rank 0 could not take the lease of {cfg.train.run_dir}")
    return lease


class Trainer:
    """One process of a training run: set up from the config and the run directory, then `run()`."""

    def __init__(
        self,
        cfg: RunConfig,
        device: torch.device,
        info: DistInfo,
        heartbeat: HeartbeatWriter | None = None,
        force: bool = False,
        patience: store.OutagePatience | None = None,
    ):
        """`patience`: started once the run directory is ours (the caller stops it when the run ends)."""
        t = cfg.train
        self.cfg, self.device, self.info, self.run_dir = cfg, device, info, RunDir(t.run_dir)
        self.heartbeat = heartbeat or HeartbeatWriter(self.run_dir, info.rank, info.world_size, 0)
        self.grad_accum = cfg.grad_accum_steps(info.world_size)
        self.val_steps = cfg.val_steps_per_rank(info.world_size)
        check_kernels(cfg, device)
        preflight(cfg, force)  # before a model is built or the GPU is touched
        self.lease = take_run_dir(cfg, info, device)  # one writer per run directory
        if (
            patience is not None
        ):  # the run has started: from here an outage of the store is waited out
            patience.start()
        self.heartbeat.start()  # only once the run directory is ours: never over another trainer's heartbeats
        try:
            self._set_up(cfg, device, info)
        except BaseException:
            if self.lease is not None:
                self.lease.release()
            raise

    def _set_up(self, cfg: RunConfig, device: torch.device, info: DistInfo) -> None:
        t = cfg.train
        if info.is_master:
            for path in store.remove_stale_temporaries(t.run_dir):
                log.info("removed %s, left by a killed write", path)
        data = {"url": cfg.data.url, "fingerprint": data_fingerprint(cfg.data.url)}
        accel.configure(device, tf32=t.tf32, attention=t.attention)
        self.amp_dtype = accel.autocast_dtype(cfg, device)
        self.model, self.optimizer = build_model(cfg, device)
        self.loader, self.val_loader = build_loaders(cfg, info)
        resumed = resume(
            cfg, self.model, self.optimizer, self.loader, device, info, data["fingerprint"]
        )
        self.start_step = resumed.step if resumed else 0
        self._restore_loop_state(resumed.train_state() if resumed else None)
        self.step_model = wrap(self.model, t, info, device)
        self._open_run_files(info, device)
        # wte and wpe are used first in the forward, so their gradients are the last this rank's backward makes
        body = self.model.transformer
        first_used = [body.wte.weight] + ([body.wpe.weight] if body.wpe is not None else [])
        self.telemetry = RankTelemetry(t.telemetry_every, info, device, last_grads=first_used)
        self.step_setup = StepSetup(
            self.step_model,
            self.optimizer,
            self.telemetry.timed(self.loader.next_batch),
            grad_accum=self.grad_accum,
            device=device,
            grad_clip=cfg.optim.grad_clip,
            autocast_dtype=self.amp_dtype,
            ddp=info.enabled,
            loss_chunk=t.loss_chunk,
        )
        self.poison = Poison(cfg.debug)  # faults injected on purpose: a testing aid, off by default
        self.death = Death(cfg.debug, self.run_dir, info.is_master)
        self.profiler = StepProfiler(t.profile_steps, self.run_dir, info.rank, device)
        self.checkpointer = Checkpointer(
            cfg,
            model=self.model,
            optimizer=self.optimizer,
            loader=self.loader,
            device=device,
            info=info,
            data=data,
            extra_state=lambda: {"guard": self.guard.state_dict(), "data_batch": self.batch},
            latest=resumed.url if resumed else None,
            after_save=self.logs.flush if self.logs else None,
        )
        stop_signal.install()  # (already, when started by cluster/worker.py or main below)
        n_params = self.model.num_parameters(
            exclude_lookups=True
        )  # tables only read from are no matmuls
        self.flops_per_step = flops_per_token(cfg.model, n_params, t.seq_len) * t.total_batch_tokens
        self.peak = peak_flops(device)

    def _restore_loop_state(self, saved: TrainState | None) -> None:
        """The guard's history and the position in the token stream in step batches (which differs from the
        step once a rollback has skipped data) come back from the checkpoint, so a resumed run decides alike."""
        self.guard = StepGuard(self.cfg.guard)
        self.guard.load_state_dict(saved.guard if saved else {})
        batch = saved.data_batch if saved else None
        self.batch = self.start_step if batch is None else batch
        self.skip_ranges = sorted(parse_range(r) for r in self.cfg.data.skip_batches)

    def _open_run_files(self, info: DistInfo, device: torch.device) -> None:
        """Rank 0's files: the resolved config, and the growing ones (metrics, events, samples, telemetry),
        written off the step path on an object store. Other ranks write none."""
        cfg, t = self.cfg, self.cfg.train
        self.logs = LogFiles() if info.is_master else None
        self.metrics = self.events = self.samples = self.telemetry_log = None
        if self.logs is None:
            return
        resolved = {
            "world_size": info.world_size,
            "grad_accum_steps": self.grad_accum,
            "device": str(device),
        }
        store.write_json(self.run_dir.config, {**json.loads(cfg.to_json()), "resolved": resolved})
        self.metrics = MetricsLog(t.run_dir, self.start_step, self.logs)
        self.events = self.logs.open(self.run_dir.events)
        if cfg.eval.sample_every:
            self.samples = self.logs.open(self.run_dir.samples)
        if t.telemetry_every:
            self.telemetry_log = self.logs.open(
                self.run_dir.telemetry, keep=lambda ln: line_step(ln) < self.start_step
            )

    def amp(self):
        return (
            torch.autocast(self.device.type, dtype=self.amp_dtype)
            if self.amp_dtype
            else nullcontext()
        )

    def run(self) -> dict[str, Any]:
        t = self.cfg.train
        step, stopped_by = self.start_step, self._signalled_before_start()
        last: dict[str, Any] = {"loss": None, "val_loss": None}
        try:
            while stopped_by is None and step < t.max_steps:
                self.death.at(step, settle=self.checkpointer.wait)
                record = self._train_and_log(step)
                last.update(loss=record["loss"], val_loss=record.get("val_loss", last["val_loss"]))
                diverged = self.guard.diverged()
                step += 1
                if diverged:  # every rank sees the same losses and norms, so every rank stops here
                    stopped_by = "diverged"
                    self._event({"event": "diverged", "step": step - 1, **diverged.to_json()})
                    break
                stopped_by = self._checkpoint_or_stop(step)
                if stopped_by is not None:
                    break
            self.checkpointer.wait()  # a write still in flight (a run that stopped between checkpoints)
            if self.logs is not None:
                self.logs.flush()  # while the run directory is still ours
        except BaseException:
            self._flush_on_error()
            raise
        finally:
            self.checkpointer.close()
            self.profiler.close(step)
            self.loader.close()
            self.val_loader.close()
            if self.lease is not None:
                self.lease.release()
        return self._result(step, stopped_by, last)

    def _signalled_before_start(self) -> str | None:
        """A stop signal that came during start-up (any rank's): the run stops before its first step, with
        nothing new to save."""
        mine = stop_signal.received()
        if not distributed.any_true(mine is not None, self.device):
            return None
        log.warning(
            "stopped by %s before the first step: nothing new to save", mine or "a peer rank"
        )
        return mine or "peer rank signal"

    def _train_and_log(self, step: int) -> dict[str, Any]:
        """Step `step` with the evaluations due before it: its metrics line, logged (and printed at log_every)."""
        t = self.cfg.train
        record = self._evaluate(step)
        self.profiler.before(step)
        record = {**self._step(step), **record, **self.checkpointer.timings()}
        self.profiler.after(step)
        self.heartbeat.progress(step + 1, record["step_ms"] / 1000, self.telemetry.busy_s)
        if self.telemetry.due(step):
            record.update(self._telemetry_window(step))
        if self.metrics is not None:
            self.metrics.log(record)
            if step % t.log_every == 0 or step == t.max_steps - 1 or "val_loss" in record:
                print(console_line(record, t.max_steps), flush=True)
        return record

    def _checkpoint_or_stop(self, step: int) -> str | None:
        """After `step` steps, every rank together: a checkpoint when one is due, and why the run stops now (a
        signal to any rank, stop_after_steps), or None. A lost lease stops it without writing one more byte."""
        stopped_by = self._stop_reason(step)
        lost = self.lease is not None and self.lease.lost.is_set()
        verdict = distributed.max_over_ranks(
            2 if lost else int(stopped_by is not None), self.device
        )
        if verdict == 2:  # someone else writes this run directory now: not one more byte from us
            raise LeaseLost(
                f"the lease of {self.cfg.train.run_dir} was taken by "
                f"{self.lease.lost_to if self.lease else 'another writer'} at step {step}; "
                "stopped without writing"
            )
        self.heartbeat.phase("checkpoint")
        self.checkpointer.save_if_due(step, stopping=verdict == 1)
        self.heartbeat.phase("step")
        return (stopped_by or "peer rank signal") if verdict == 1 else None

    def _result(self, step: int, stopped_by: str | None, last: dict[str, Any]) -> dict[str, Any]:
        """How the run ended (result.json, written by rank 0; the flow and the launcher read it)."""
        divergence = self.guard.diverged() if stopped_by == "diverged" else None
        result = {
            "final_step": step,
            "loss": last["loss"],
            "val_loss": last["val_loss"],
            "checkpoint": self.checkpointer.latest,
            "complete": step >= self.cfg.train.max_steps,
            "stopped_by": stopped_by,
            **({"diverged": divergence.to_json()} if divergence else {}),
        }
        if self.info.is_master:
            store.write_json(self.run_dir.result, result)
        return result

    def _evaluate(self, step: int) -> dict[str, Any]:
        """The val loss and samples due before `step` (each at its cadence, and both before the last step)."""
        cfg, record = self.cfg, {}
        last = step == cfg.train.max_steps - 1
        if step % cfg.eval.val_every == 0 or last:
            self.heartbeat.phase("validate")
            record["val_loss"] = evaluate_val(
                self.step_model,
                self.val_loader,
                self.val_steps,
                self.device,
                self.amp,
                cfg.train.loss_chunk,
            )
        if (
            cfg.eval.sample_every
            and step > 0
            and (step % cfg.eval.sample_every == 0 or last)
            and self.samples is not None  # rank 0's
        ):
            self.heartbeat.phase("sample")
            _sample(self.model, cfg, self.samples, step, self.amp_dtype)
        return record

    def _step(self, step: int) -> dict[str, Any]:
        """One optimizer step and its metrics line."""
        cfg, t = self.cfg, self.cfg.train
        self.heartbeat.phase("step")
        self.telemetry.step_started()
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.optim, t.max_steps)
        self._pass_over_skipped_data()
        batch = self.batch
        result = train_step(
            self.step_setup,
            lr,
            judge=lambda loss, norm: self.guard.check(step, batch, loss, norm),
            loss_scale=self.poison.loss_scale(step, batch),
            micro_steps=self._micro_steps(batch),
        )
        self.batch += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        self.telemetry.step_ended(dt)
        record = self._step_record(step, batch, lr, result, dt)
        if result.skipped is not None:
            self._event(
                {
                    "event": "skip",
                    "step": step,
                    "data_batch": batch,
                    "reason": result.skipped,
                    "loss": record["loss"],
                    "grad_norm": record["grad_norm"],
                }
            )
        return record

    def _micro_steps(self, batch: int) -> int:
        """Micro-batches of data batch `batch` per rank (fewer than grad_accum during a batch warm-up)."""
        if batch >= self.cfg.train.batch_warmup_steps:
            return self.grad_accum
        return self.cfg.micro_steps(batch, self.info.world_size)

    def _batch_tokens(self, batch: int) -> int:
        t = self.cfg.train
        return self._micro_steps(batch) * t.micro_batch * t.seq_len * self.info.world_size

    def _tokens_through(self, step: int) -> int:
        """Tokens trained on up to and including `step` (the batches of a warm-up are smaller)."""
        t = self.cfg.train
        warm = min(step + 1, t.batch_warmup_steps)
        return (
            sum(self._batch_tokens(b) for b in range(warm))
            + (step + 1 - warm) * t.total_batch_tokens
        )

    def _step_record(
        self, step: int, batch: int, lr: float, result: StepResult, dt: float
    ) -> dict[str, Any]:
        """The step's line of metrics.jsonl."""
        t = self.cfg.train
        share = self._batch_tokens(batch) / t.total_batch_tokens
        record: dict[str, Any] = {
            "step": step,
            "loss": result.loss.item(),
            "lr": lr,
            "grad_norm": float(result.norm),
            "step_ms": 1000 * dt,
            "tokens_per_s": self._batch_tokens(batch) / dt,
            "tokens_seen": self._tokens_through(step),
            "mfu": share * self.flops_per_step / dt / (self.peak * self.info.world_size)
            if self.peak
            else None,
            "mem_gb": torch.cuda.max_memory_allocated(self.device) / 1e9
            if self.device.type == "cuda"
            else None,
        }
        if batch != step:
            record["data_batch"] = batch
        if result.skipped is not None:
            record["skipped"] = result.skipped
        return record

    def _telemetry_window(self, step: int) -> dict[str, Any]:
        """Every rank's telemetry of the window ending at `step` (a collective): a telemetry.jsonl line and, for
        rank 0's metrics line, the window's summary (the slowest rank)."""
        steps = self.telemetry.steps
        ranks = self.telemetry.gather()
        if ranks is None or self.telemetry_log is None:  # another rank's: rank 0 writes the window
            return {}
        self.telemetry_log.append(
            json.dumps(window_line(step, steps, ranks), separators=(",", ":")) + "\n"
        )
        return window_summary(ranks)

    def _pass_over_skipped_data(self) -> None:
        """Before a step that would read data inside a skip range, move the loader to the range's end."""
        for start, stop in self.skip_ranges:
            if start <= self.batch < stop:
                self.loader.skip(sum(self._micro_steps(b) for b in range(self.batch, stop)))
                log.info("passing over data batches %d:%d (data.skip_batches)", self.batch, stop)
                self.batch = stop

    def _event(self, event: dict[str, Any]) -> None:
        """An entry of {run}/events.jsonl (rank 0 writes; every rank decided the same)."""
        if self.events is not None:
            self.events.append(json.dumps({"time": time.time(), **event}) + "\n")
            log.warning("%s", json.dumps(event))

    def _flush_on_error(self) -> None:
        """A run ending on an error still leaves its lines on the store, unless another writer has the run
        directory now (not one more byte then); a failing store does not hide the error that ended the run."""
        if self.logs is None or (self.lease is not None and self.lease.lost.is_set()):
            return
        try:
            self.logs.flush()
        except Exception as err:
            log.error(
                "could not write the run's last metrics, telemetry, events or samples: %s", err
            )

    def _stop_reason(self, step: int) -> str | None:
        """Why this process stops before max_steps after `step` steps (a signal, stop_after_steps), or None."""
        t = self.cfg.train
        if stop_signal.received():
            return stop_signal.received()
        if (
            t.stop_after_steps
            and step - self.start_step >= t.stop_after_steps
            and step < t.max_steps
        ):
            return "stop_after_steps"
        return None


@torch.no_grad()
def evaluate_val(
    model, val_loader: ShardLoader, steps: int, device: torch.device, amp, loss_chunk: int = 0
) -> float:
    """Mean loss over the first `steps` x world val batches (the same tokens every time), averaged over ranks.
    With `loss_chunk`, val batches need no more memory than training ones (no full logits either)."""
    model.eval()
    val_loader.reset()
    total = torch.zeros((), device=device)
    for _ in range(steps):
        x, y = val_loader.next_batch()
        with amp():
            x, y = x.to(device).long(), y.to(device).long()
            _, loss = model(x, y, loss_chunk=loss_chunk) if loss_chunk else model(x, y)
        total += loss.detach() / steps
    distributed.mean(total)
    return total.item()


def _sample(model: GPT, cfg: RunConfig, samples: LogFile, step: int, amp_dtype) -> None:
    from common.tokenizer import get_encoding
    from training.sample import sample_text

    e = cfg.eval
    texts = sample_text(
        model,
        get_encoding(),
        e.sample_prompt,
        num_samples=e.sample_count,
        max_new_tokens=e.sample_tokens,
        seed=cfg.train.seed + step,
        autocast_dtype=amp_dtype,
    )
    for text in texts:
        print(f"sample step {step}: {text!r}", flush=True)
    samples.append(json.dumps({"step": step, "samples": texts}) + "\n")


# ----------------------------------------------------------------------------- CLI


@entry_point
def main(argv: list[str] | None = None) -> int:
    stop_signal.install()  # before anything slow: a preemption warning during start-up is kept
    ap = argparse.ArgumentParser(
        prog="python -m training.train", description="Train GPT-2 (resumes automatically)."
    )
    ap.add_argument(
        "--config",
        required=True,
        help="preset name (tiny, demo, gpt2-124m, gpt2-350m, gpt2-774m, "
        "gpt2-1558m) or path to a TOML file",
    )
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (repeatable), e.g. --set max_steps=100 --set optim.max_lr=3e-4",
    )
    ap.add_argument(
        "--force",
        action="store_true",
        help="train into a run directory that holds files this project did not write",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    result = train(load_config(args.config, args.overrides), args.force)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(result), flush=True)
        if result["stopped_by"] not in (None, "diverged", "stop_after_steps"):
            print(
                f"stopped by {result['stopped_by']} at step {result['final_step']}: run the same command "
                "again to resume",
                file=sys.stderr,
                flush=True,
            )
    if result["stopped_by"] == "diverged":
        return exit_codes.DIVERGED
    return exit_codes.REQUEUE if result["stopped_by"] else exit_codes.OK


if __name__ == "__main__":
    raise SystemExit(main())
