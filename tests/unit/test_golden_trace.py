"""The `tiny` preset's first steps against a loss trace kept in the repository (golden/tiny_trace.json): a change
to the model, its initialisation, the optimizer, the LR schedule, the step or the loader's order of tokens
moves these losses, and fails here at once instead of in an end-to-end comparison minutes later.

The shards are the tests' own random tokens (numpy's PCG64: the same on every machine); the model, optimizer,
loader and step are training's own, in this process. A change that is meant to move the trace rewrites the
file: GPT2_GOLDEN_UPDATE=1 pytest tests/unit/test_golden_trace.py (and the diff shows it in review)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from common.shards import write_manifest, write_shard
from training.config import load_config
from training.distributed import DistInfo
from training.optim import cosine_lr
from training.step import StepSetup, train_step
from training.train import build_loaders, build_model

GOLDEN = Path(__file__).parent / "golden" / "tiny_trace.json"
STEPS = 12


def tiny_trace(data_url: str) -> list[float]:
    cfg = load_config("tiny", [f"data_url={data_url}", f"max_steps={STEPS}", "warmup_steps=4"])
    cpu = torch.device("cpu")
    model, optimizer = build_model(cfg, cpu)
    loader, val = build_loaders(cfg, DistInfo())
    setup = StepSetup(
        model,
        optimizer,
        loader.next_batch,
        grad_accum=cfg.grad_accum_steps(1),
        device=cpu,
        grad_clip=cfg.optim.grad_clip,
    )
    o = cfg.optim
    try:
        return [
            train_step(
                setup,
                cosine_lr(
                    step,
                    max_lr=o.max_lr,
                    min_lr=o.max_lr * o.min_lr_ratio,
                    warmup_steps=o.warmup_steps,
                    max_steps=STEPS,
                ),
            ).loss.item()
            for step in range(STEPS)
        ]
    finally:
        loader.close()
        val.close()


def learnable_shards(url: str) -> None:
    """A val and two train shards of a stream a model learns in a few steps: one random phrase of 61 tokens
    over and over."""
    phrase = np.random.default_rng(7).integers(0, 50257, 61, dtype=np.uint16)
    stream = np.tile(phrase, 40_000 // phrase.size + 1)
    write_manifest(
        url, [write_shard(url, i, stream[:n]) for i, n in enumerate((4096, 20_000, 20_000))]
    )


def test_the_tiny_presets_first_steps_keep_their_losses(tmp_path):
    learnable_shards(str(tmp_path))
    losses = tiny_trace(str(tmp_path))
    if os.environ.get("GPT2_GOLDEN_UPDATE"):
        GOLDEN.write_text(json.dumps({"steps": STEPS, "losses": losses}, indent=1) + "\n")
        pytest.skip(f"rewrote {GOLDEN}")
    golden = json.loads(GOLDEN.read_text())
    assert golden["steps"] == STEPS
    # 1e-5: a CPU of another instruction set may round the last bits of a sum differently; a real change of
    # the numbers moves them by far more (the loss falls ~0.05 per step here)
    assert losses == pytest.approx(golden["losses"], rel=1e-5)
    assert losses[-1] < losses[0] - 0.2  # it trains: a trace of constants would be no reference
