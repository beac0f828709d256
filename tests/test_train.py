"""The training job as Slurm runs it: real `python -m training.train` and real torchrun (gloo on CPU)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO
from training import checkpoint as ck
from training.config import load_config
from training.model import GPT
from training.optim import configure_optimizer
from training.train import REQUEUE_EXIT_CODE

# Small enough for ~30 ms steps on 2 CPU cores, with gradient accumulation in play.
BASE = ["micro_batch=2", "seq_len=32", "total_batch_tokens=256", "max_steps=8", "warmup_steps=2",
        "val_every=3", "val_tokens=128", "sample_every=0", "checkpoint_every=100", "log_every=1"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def train_cmd(data, run, *extra, nproc=1):
    sets = [a for kv in BASE + [f"data_url={data}", f"run_dir={run}", *extra] for a in ("--set", kv)]
    if nproc == 1:
        return [sys.executable, "-m", "training.train", "--config", "tiny", *sets]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "training.train", "--config", "tiny", *sets]


def run_train(data, run, *extra, nproc=1, expect=0):
    p = subprocess.run(train_cmd(data, run, *extra, nproc=nproc), cwd=REPO, env=_env(), capture_output=True,
                       text=True, timeout=600)
    ok = p.returncode == expect if nproc == 1 else (p.returncode == 0) == (expect == 0)
    assert ok, f"exit {p.returncode} (wanted {expect}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def losses(run):
    return [(m["step"], m["loss"]) for m in metrics(run)]


def test_metrics_and_checkpoints_of_a_run(demo_data, tmp_path):
    run = tmp_path / "run"
    p = run_train(demo_data, run, "checkpoint_every=4")
    m = metrics(run)
    assert [r["step"] for r in m] == list(range(8))
    assert all({"loss", "lr", "grad_norm", "tokens_per_s", "step_ms", "tokens_seen"} <= r.keys() for r in m)
    assert [r["step"] for r in m if "val_loss" in r] == [0, 3, 6, 7]
    assert all(r["mfu"] is None for r in m)  # CPU: no peak to compare against, so no invented MFU
    assert m[-1]["loss"] < m[0]["loss"]
    assert ck.list_steps(str(run)) == [4, 8]
    assert json.loads((run / "config.json").read_text())["resolved"]["grad_accum_steps"] == 4
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["final_step"] == 8 and result["complete"] and result["checkpoint"].endswith("step_000008")
    assert "step      7/8 | loss" in p.stdout


def test_resume_is_bit_exact_single_process(demo_data, tmp_path):
    run_train(demo_data, tmp_path / "straight")
    run_train(demo_data, tmp_path / "split", "stop_after_steps=3", expect=REQUEUE_EXIT_CODE)
    assert ck.list_steps(str(tmp_path / "split")) == [3]
    run_train(demo_data, tmp_path / "split")
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")  # exact equality, not approx


def test_resume_is_bit_exact_under_torchrun_two_ranks(demo_data, tmp_path):
    run_train(demo_data, tmp_path / "straight", nproc=2)
    run_train(demo_data, tmp_path / "split", "stop_after_steps=5", nproc=2, expect=REQUEUE_EXIT_CODE)
    ckpt = ck.latest_checkpoint(str(tmp_path / "split"))
    assert ckpt.step == 5 and ckpt.world_size == 2 and {"rank_00000.pt", "rank_00001.pt"} <= set(ckpt.manifest["files"])
    assert ckpt.rank_state(0)["loader"]["base"] == ckpt.rank_state(1)["loader"]["base"]
    run_train(demo_data, tmp_path / "split", nproc=2)
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")


def test_ddp_two_ranks_match_one_process_with_the_same_global_batch(demo_data, tmp_path):
    run_train(demo_data, tmp_path / "one")
    run_train(demo_data, tmp_path / "two", nproc=2)
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(a) == len(b) == 8
    for r1, r2 in zip(a, b):
        assert r1["loss"] == pytest.approx(r2["loss"], abs=1e-5)
        if "val_loss" in r1:
            assert r1["val_loss"] == pytest.approx(r2["val_loss"], abs=1e-5)


@pytest.mark.slow
def test_compiled_ddp_with_the_chunked_loss_matches_one_plain_process(demo_data, tmp_path):
    """The multi-GPU combination (DDP + torch.compile + train.loss_chunk) learns what the plain path learns."""
    run_train(demo_data, tmp_path / "plain", "max_steps=4")
    run_train(demo_data, tmp_path / "fast", "max_steps=4", "compile=true", "loss_chunk=48", nproc=2)
    a, b = metrics(tmp_path / "plain"), metrics(tmp_path / "fast")
    assert len(a) == len(b) == 4
    for r1, r2 in zip(a, b):
        assert r1["loss"] == pytest.approx(r2["loss"], abs=1e-4)
        assert r1.get("val_loss", 0) == pytest.approx(r2.get("val_loss", 0), abs=1e-4)


@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGTERM])
def test_preemption_signal_checkpoints_and_exits_with_requeue_code(demo_data, tmp_path, sig):
    run = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(demo_data, run, "max_steps=5000", "val_every=5000"), cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.1)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == REQUEUE_EXIT_CODE, err[-3000:]
    done = len(metrics(run))
    assert ck.latest_checkpoint(str(run)).step == done  # the step in flight was finished, then saved
    assert json.loads(out.strip().splitlines()[-1])["stopped_by"] == sig.name
    # and the next launch resumes from there
    run_train(demo_data, run, f"max_steps={done + 2}", "val_every=5000")
    assert [m["step"] for m in metrics(run)] == list(range(done + 2))


def test_missing_data_fails_before_anything_is_written(tmp_path):
    p = run_train(tmp_path / "nodata", tmp_path / "run", expect=2)
    assert "no train shards" in p.stderr and not (tmp_path / "run").exists()


def test_bad_config_fails_naming_the_field(tmp_path):
    p = run_train(tmp_path, tmp_path / "run", "optim.max_lr=-1", expect=2)
    assert "optim.max_lr" in p.stderr


def test_model_overfits_a_single_batch(demo_data):
    """The lecture's first sanity check: the tiny model memorises one fixed batch."""
    from training.data import ShardLoader

    cfg = load_config("tiny")
    torch.manual_seed(0)
    model = GPT(cfg.model)
    opt = configure_optimizer(model, lr=1e-2, weight_decay=0.0)
    x, y = ShardLoader(demo_data, "train", 4, 32).next_batch()
    x, y = x.long(), y.long()
    for step in range(300):
        opt.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        if loss.item() < 0.1:
            break
    assert loss.item() < 0.1, f"loss {loss.item():.3f} after {step + 1} steps"


@pytest.mark.slow
def test_compile_flag_keeps_losses_val_and_sampling(demo_data, tmp_path):
    run_train(demo_data, tmp_path / "eager", "max_steps=3", "val_every=2")
    p = run_train(demo_data, tmp_path / "compiled", "max_steps=3", "val_every=2", "compile=true", "sample_every=2")
    a, b = metrics(tmp_path / "eager"), metrics(tmp_path / "compiled")
    for r1, r2 in zip(a, b):
        assert r1["loss"] == pytest.approx(r2["loss"], abs=1e-4)
        assert r1.get("val_loss", 0) == pytest.approx(r2.get("val_loss", 0), abs=1e-4)
    assert "sample step 2:" in p.stdout and (tmp_path / "compiled" / "samples.jsonl").exists()


def test_missing_tokenizer_files_fail_at_start_when_sampling_is_on(demo_data, tmp_path):
    env = dict(_env(), TIKTOKEN_CACHE_DIR=str(tmp_path / "empty-cache"), HOME=str(tmp_path))
    p = subprocess.run(train_cmd(demo_data, tmp_path / "run", "sample_every=2"), cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "training.tokenizer stage" in p.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
