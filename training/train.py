"""The training job: one process, or one per GPU under torchrun (any --nnodes / --nproc_per_node).

    python -m training.train --config configs/<preset>.toml [--set key=value ...]
    torchrun --nproc_per_node 8 -m training.train --config gpt2-124m --set run_dir=s3://bucket/runs/x

Resumes automatically from the latest valid checkpoint in `run_dir`, bit-exactly on the same world size.
On SIGUSR2 or SIGTERM (Slurm's warning before preemption or the time limit) every rank finishes its step,
a checkpoint is written collectively, and the process exits with REQUEUE_EXIT_CODE.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from training import checkpoint as ck
from training import accel, distributed, store
from training.config import ConfigError, RunConfig, load_config
from training.data import ShardError, ShardLoader, list_shards
from training.metrics import MetricsLog, console_line, peak_flops
from training.model import GPT, flops_per_token
from training.optim import configure_optimizer, cosine_lr
from training.step import train_step
from training.tokenizer import TokenizerFilesError

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "stopped on request with a checkpoint; run me again"
CONFIG_ERROR_EXIT_CODE = 2

log = logging.getLogger("training")


# ----------------------------------------------------------------------------- set-up helpers


def resolve_device(cfg: RunConfig) -> torch.device:
    want = cfg.train.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is visible")
    return torch.device(want)


def autocast_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype | None:
    dtype = cfg.train.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    return torch.bfloat16 if dtype == "bfloat16" else None


def rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class StopSignal:
    """Remembers SIGUSR2/SIGTERM instead of dying mid-step; the loop checks it after each step."""

    def __init__(self):
        self.received: str | None = None
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name


def _check_resume_compatible(saved: RunConfig, cfg: RunConfig) -> None:
    if saved.model != cfg.model:
        raise ConfigError(f"run_dir holds a checkpoint of a different model ({saved.model} vs {cfg.model}); "
                          "use a new run_dir")
    ignore = {"train": {"stop_after_steps"}}
    changed = [k for k in ("data", "optim", "train")
               if getattr(saved, k).model_dump(exclude=ignore.get(k)) != getattr(cfg, k).model_dump(exclude=ignore.get(k))]
    if changed:
        log.warning("resuming with changed config sections %s (bit-exact resume assumes none)", changed)


# ----------------------------------------------------------------------------- the job


def train(cfg: RunConfig) -> dict[str, Any]:
    device = resolve_device(cfg)
    info = distributed.init(device.type)
    try:
        return _train(cfg, device, info)
    finally:
        distributed.shutdown()


def _train(cfg: RunConfig, device: torch.device, info: distributed.DistInfo) -> dict[str, Any]:
    t, run_dir = cfg.train, cfg.train.run_dir
    grad_accum = cfg.grad_accum_steps(info.world_size)
    val_steps = cfg.val_steps_per_rank(info.world_size)
    # Fail on an unusable store or missing data before building a model or touching the GPU.
    store.preflight(cfg.data.data_url, write=False)
    list_shards(cfg.data.data_url, "train")
    list_shards(cfg.data.data_url, "val")
    store.preflight(run_dir, write=True)
    if cfg.eval.sample_every:
        from training.tokenizer import get_encoding

        get_encoding()  # sampling needs the BPE files: fail now, not at the first sample hours in

    accel.configure(device, tf32=t.tf32, attention=t.attention)
    amp_dtype = autocast_dtype(cfg, device)
    amp = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext

    # Same seed on every rank: identical initial weights (DDP also broadcasts them).
    random.seed(t.seed)
    np.random.seed(t.seed)
    torch.manual_seed(t.seed)
    model = GPT(cfg.model).to(device)
    optimizer = configure_optimizer(model, lr=cfg.optim.max_lr, weight_decay=cfg.optim.weight_decay,
                                    betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
                                    device_type=device.type)
    loader = ShardLoader(cfg.data.data_url, "train", t.micro_batch, t.seq_len, info.rank, info.world_size,
                         shuffle=cfg.data.shuffle, seed=t.seed, verify=cfg.data.verify_checksums)
    val_loader = ShardLoader(cfg.data.data_url, "val", t.micro_batch, t.seq_len, info.rank, info.world_size,
                             verify=cfg.data.verify_checksums)

    start_step = 0
    latest = ck.latest_checkpoint(run_dir)
    if latest is not None:
        _check_resume_compatible(latest.config(), cfg)
        ck.load_model_state(model, latest.model_state_bytes())
        optimizer.load_state_dict(latest.optimizer_state())
        if latest.world_size == info.world_size:
            rank_state = latest.rank_state(info.rank)
            set_rng_state(rank_state["rng"], device)
        else:
            # Elastic resume: the token stream continues where it stopped; the loss trace is no longer bit-exact.
            rank_state = latest.rank_state(0)
            log.warning("resuming a %d-rank checkpoint on %d ranks", latest.world_size, info.world_size)
        loader.load_state_dict(rank_state["loader"])
        start_step = latest.step
        if info.is_master:
            log.info("resumed from %s (step %d)", latest.url, start_step)

    raw_model = model
    if t.compile:
        model = torch.compile(model, mode=None if t.compile_mode == "default" else t.compile_mode)
    if info.enabled:
        model = DDP(model, device_ids=[info.local_rank] if device.type == "cuda" else None)

    if info.is_master:
        store.write_json(store.join(run_dir, "config.json"),
                         {**json.loads(cfg.to_json()), "resolved": {"world_size": info.world_size,
                                                                    "grad_accum_steps": grad_accum,
                                                                    "device": str(device)}})
    metrics = MetricsLog(run_dir, start_step) if info.is_master else None
    stop = StopSignal()
    n_params = raw_model.num_parameters(exclude_positions=True)  # position lookups are not matmuls
    tokens_per_step = t.total_batch_tokens
    flops_step = flops_per_token(cfg.model, n_params, t.seq_len) * tokens_per_step
    peak = peak_flops(device)
    min_lr = cfg.optim.max_lr * cfg.optim.min_lr_ratio
    stopped_by = None
    last = {"step": start_step, "loss": None, "val_loss": None}

    def save(step: int) -> str | None:
        url = ck.write_checkpoint(
            run_dir, step, model=raw_model, optimizer=optimizer, config=cfg,
            rank_state={"loader": loader.state_dict(), "rng": rng_state(device)},
            rank=info.rank, world_size=info.world_size, gather=distributed.gather_to_master,
            train_state={"tokens_seen": step * tokens_per_step})
        if info.is_master:
            ck.prune(run_dir, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every, step)
            metrics.flush()
            log.info("checkpoint %s", url)
        distributed.barrier()
        return url

    step = start_step
    checkpoint_url = None
    while step < t.max_steps:
        record: dict[str, Any] = {}
        last_step = step == t.max_steps - 1
        if step % cfg.eval.val_every == 0 or last_step:
            record["val_loss"] = evaluate_val(model, val_loader, val_steps, device, amp, t.loss_chunk)
        if cfg.eval.sample_every and step > 0 and step % cfg.eval.sample_every == 0 and info.is_master:
            _sample(raw_model, cfg, run_dir, step, amp_dtype)

        t0 = time.perf_counter()
        lr = cosine_lr(step, max_lr=cfg.optim.max_lr, min_lr=min_lr, warmup_steps=cfg.optim.warmup_steps,
                       max_steps=t.max_steps)
        loss_accum, norm = train_step(model, optimizer, loader.next_batch, grad_accum=grad_accum, device=device,
                                      lr=lr, grad_clip=cfg.optim.grad_clip, autocast_dtype=amp_dtype,
                                      ddp=info.enabled, loss_chunk=t.loss_chunk)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0

        loss_value = loss_accum.item()
        if not np.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value} at step {step}; stopping (latest checkpoint is intact)")
        record = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": float(norm), "step_ms": 1000 * dt,
                  "tokens_per_s": tokens_per_step / dt, "tokens_seen": (step + 1) * tokens_per_step,
                  "mfu": flops_step / dt / (peak * info.world_size) if peak else None,
                  "mem_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
                  **record}
        last.update(step=step + 1, loss=loss_value, val_loss=record.get("val_loss", last["val_loss"]))
        if info.is_master:
            metrics.log(record)
            if step % t.log_every == 0 or last_step or "val_loss" in record:
                print(console_line(record, t.max_steps), flush=True)
        step += 1

        stopped_by = stop.received
        if t.stop_after_steps and step - start_step >= t.stop_after_steps and step < t.max_steps:
            stopped_by = stopped_by or "stop_after_steps"
        stop_now = distributed.any_true(stopped_by is not None, device)
        if step % cfg.checkpoint.checkpoint_every == 0 or step == t.max_steps or stop_now:
            checkpoint_url = save(step)
        if stop_now:
            stopped_by = stopped_by or "peer rank signal"
            break

    loader.close()
    val_loader.close()
    if metrics is not None:
        metrics.flush()
    result = {"final_step": step, "loss": last["loss"], "val_loss": last["val_loss"],
              "checkpoint": checkpoint_url or (latest.url if latest is not None else None),
              "complete": step >= t.max_steps, "stopped_by": stopped_by}
    if info.is_master:
        store.write_json(store.join(run_dir, "result.json"), result)
    return result


@torch.no_grad()
def evaluate_val(model, val_loader: ShardLoader, steps: int, device: torch.device, amp,
                 loss_chunk: int = 0) -> float:
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


def _sample(model: GPT, cfg: RunConfig, run_dir: str, step: int, amp_dtype) -> None:
    from training.sample import sample_text
    from training.tokenizer import get_encoding

    e = cfg.eval
    texts = sample_text(model, get_encoding(), e.sample_prompt, num_samples=e.sample_count,
                        max_new_tokens=e.sample_tokens, seed=cfg.train.seed + step, autocast_dtype=amp_dtype)
    for text in texts:
        print(f"sample step {step}: {text!r}", flush=True)
    store.append_text(store.join(run_dir, "samples.jsonl"), json.dumps({"step": step, "samples": texts}) + "\n")


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.train", description="Train GPT-2 (resumes automatically).")
    ap.add_argument("--config", required=True, help="preset name (tiny, gpt2-124m) or path to a TOML file")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value (repeatable), e.g. --set max_steps=100 --set optim.max_lr=3e-4")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        result = train(cfg)
    except (ConfigError, ShardError, ck.CheckpointError, store.StoreError, TokenizerFilesError) as err:
        print(f"error: {err}", file=sys.stderr)
        return CONFIG_ERROR_EXIT_CODE
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(result), flush=True)
    if result["stopped_by"]:
        return REQUEUE_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
