"""The training job as Slurm runs it: real `python -m training.train` and real torchrun (gloo on CPU)."""

import json
import signal
import subprocess
import time

import pytest
from helpers import (
    FAST_RECIPE,
    REPO,
    losses,
    metrics,
    run_train,
    train_cmd,
    train_env,
    wait_for_steps,
)

from common.exit_codes import BAD_INPUT, REQUEUE
from training import checkpoint as ck


@pytest.fixture(scope="module")
def one_process(demo_data, tmp_path_factory):
    """The tests' run, uninterrupted, in one process: a reference of the resume and DDP tests."""
    run = tmp_path_factory.mktemp("one-process") / "run"
    run_train(demo_data, run)
    return run


@pytest.fixture(scope="module")
def two_ranks(demo_data, tmp_path_factory):
    """The same run under torchrun with two ranks."""
    run = tmp_path_factory.mktemp("two-ranks") / "run"
    run_train(demo_data, run, nproc=2)
    return run


def test_metrics_and_checkpoints_of_a_run(demo_data, tmp_path):
    run = tmp_path / "run"
    p = run_train(demo_data, run, "checkpoint_every=4")
    m = metrics(run)
    assert [r["step"] for r in m] == list(range(8))
    assert all(
        {"loss", "lr", "grad_norm", "tokens_per_s", "step_ms", "tokens_seen"} <= r.keys() for r in m
    )
    assert [r["step"] for r in m if "val_loss" in r] == [0, 3, 6, 7]
    assert all(r["mfu"] is None for r in m)  # CPU: no peak to compare against, so no invented MFU
    assert m[-1]["loss"] < m[0]["loss"]
    assert ck.list_steps(str(run)) == [4, 8]
    # the step-4 checkpoint, written in the background: what it cost the loop, then the write, in later lines
    assert "ckpt_block_s" in m[4] and [r["step"] for r in m if "ckpt_block_s" in r] == [4]
    assert [r for r in m if "ckpt_write_s" in r] and all(
        r["step"] >= 4 for r in m if "ckpt_write_s" in r
    )
    assert json.loads((run / "config.json").read_text())["resolved"]["grad_accum_steps"] == 4
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert (
        result["final_step"] == 8
        and result["complete"]
        and result["checkpoint"].endswith("step_000008")
    )
    assert "step      7/8 | loss" in p.stdout


def test_profile_steps_writes_a_trace_of_those_steps_into_the_run_directory(demo_data, tmp_path):
    run = tmp_path / "run"
    run_train(demo_data, run, "profile_steps=2:4")
    trace = json.loads((run / "profiles" / "steps_2-4" / "rank-00000.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert (
        {"train step 2", "train step 3"} <= names
        and "train step 4" not in names
        and "train step 1" not in names
    )
    assert any(
        n and n.startswith("aten::") for n in names
    )  # the ops of those steps, not just the spans
    p = run_train(demo_data, tmp_path / "bad", "profile_steps=4:2", expect=2)
    assert (
        "train.profile_steps entry '4:2' is not a 'start:stop' range with start < stop" in p.stderr
    )


def test_resume_is_bit_exact_single_process(demo_data, one_process, tmp_path):
    run_train(demo_data, tmp_path / "split", "stop_after_steps=3", expect=REQUEUE)
    assert ck.list_steps(str(tmp_path / "split")) == [3]
    run_train(demo_data, tmp_path / "split")
    assert losses(tmp_path / "split") == losses(one_process)  # exact equality, not approx


def test_resume_is_bit_exact_under_torchrun_two_ranks(demo_data, two_ranks, tmp_path):
    run_train(demo_data, tmp_path / "split", "stop_after_steps=5", nproc=2, expect=REQUEUE)
    ckpt = ck.latest_checkpoint(str(tmp_path / "split"))
    assert (
        ckpt.step == 5
        and ckpt.world_size == 2
        and {"rank_00000.pt", "rank_00001.pt"} <= set(ckpt.manifest["files"])
    )
    assert ckpt.rank_state(0)["loader"]["base"] == ckpt.rank_state(1)["loader"]["base"]
    run_train(demo_data, tmp_path / "split", nproc=2)
    assert losses(tmp_path / "split") == losses(two_ranks)


def test_ddp_two_ranks_match_one_process_with_the_same_global_batch(one_process, two_ranks):
    a, b = metrics(one_process), metrics(two_ranks)
    assert len(a) == len(b) == 8
    for r1, r2 in zip(a, b):
        assert r1["loss"] == pytest.approx(r2["loss"], abs=1e-5)
        if "val_loss" in r1:
            assert r1["val_loss"] == pytest.approx(r2["val_loss"], abs=1e-5)


def test_the_fast_recipe_trains_resumes_bit_exactly_and_runs_under_ddp(demo_data, tmp_path):
    """Muon's state in the checkpoint, the untied head's tensor, no position table: a stop and resume give
    the loss trace of a straight run, bit for bit; two ranks learn what one process learns."""
    straight = tmp_path / "straight"
    run_train(demo_data, straight, *FAST_RECIPE)
    m = metrics(straight)
    assert len(m) == 8 and m[-1]["loss"] < m[0]["loss"]
    split = tmp_path / "split"
    run_train(demo_data, split, *FAST_RECIPE, "stop_after_steps=3", expect=REQUEUE)
    opt = ck.latest_checkpoint(str(split)).optimizer_state()
    assert set(opt) == {"muon", "adamw"}
    run_train(demo_data, split, *FAST_RECIPE)
    assert losses(split) == losses(straight)
    ddp = tmp_path / "ddp"
    run_train(demo_data, ddp, *FAST_RECIPE, nproc=2)
    for r1, r2 in zip(m, metrics(ddp), strict=True):
        assert r1["loss"] == pytest.approx(r2["loss"], abs=1e-4)


def test_a_batch_warm_up_grows_the_batch_in_whole_micro_batches_and_resumes_bit_exactly(
    demo_data, one_process, tmp_path
):
    """From a quarter of the batch to all of it over 4 steps, in micro-batches of 2 x 32 tokens (4 make the
    batch): 1, 2, 2, 3, then 4 each; stopped inside the warm-up and resumed, the same trace bit for bit."""
    warm = ["batch_warmup_steps=4", "batch_warmup_start=0.25"]
    straight = tmp_path / "straight"
    run_train(demo_data, straight, *warm)
    m = metrics(straight)
    micro = [1, 2, 2, 3, 4, 4, 4, 4]
    assert [r["tokens_seen"] for r in m] == [64 * sum(micro[: i + 1]) for i in range(8)]
    assert (
        m[0]["loss"] != metrics(one_process)[0]["loss"]
    )  # a smaller first batch, not the same step
    split = tmp_path / "split"
    run_train(demo_data, split, *warm, "stop_after_steps=2", expect=REQUEUE)
    run_train(demo_data, split, *warm)
    assert losses(split) == losses(straight)
    # data passed over (a rollback's skip) is passed over in the warm-up's sizes: 2 steps after skipping
    # batches 1 and 2 leave the loader where 4 straight steps do (1 + [2 + 2] + 3 micro-batches)
    skipped = tmp_path / "skipped"
    run_train(
        demo_data, skipped, *warm, "data.skip_batches=['1:3']", "stop_after_steps=2", expect=REQUEUE
    )
    four = tmp_path / "four"
    run_train(demo_data, four, *warm, "stop_after_steps=4", expect=REQUEUE)
    loader = [ck.latest_checkpoint(str(r)).rank_state(0)["loader"] for r in (skipped, four)]
    assert loader[0] == loader[1]
    # two ranks: micro-batches of 2 x 2 x 32 tokens, 2 make the batch: 1, 1, 1, 2, then 2 each
    ddp = tmp_path / "ddp"
    run_train(demo_data, ddp, *warm, nproc=2)
    micro2 = [1, 1, 1, 2, 2, 2, 2, 2]
    assert [r["tokens_seen"] for r in metrics(ddp)] == [
        128 * sum(micro2[: i + 1]) for i in range(8)
    ]
    # a batch of one micro-batch has nothing to grow by: one line, before anything runs
    p = run_train(demo_data, tmp_path / "bad", *warm, "micro_batch=8", expect=2)
    assert "train.batch_warmup_steps grows the batch in whole micro-batches" in p.stderr
    assert "Traceback" not in p.stderr


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


@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGTERM, signal.SIGINT])
def test_preemption_signal_checkpoints_and_exits_with_requeue_code(demo_data, tmp_path, sig):
    """Slurm's warnings (USR2, TERM) and Ctrl-C (INT) alike: the step in flight finished, a checkpoint, exit 75,
    one line saying how to go on, no traceback."""
    run = tmp_path / "run"
    proc = subprocess.Popen(
        train_cmd(demo_data, run, "max_steps=5000", "val_every=5000"),
        cwd=REPO,
        env=train_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_steps(run, 3)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == REQUEUE, err[-3000:]
    done = len(metrics(run))
    assert (
        ck.latest_checkpoint(str(run)).step == done
    )  # the step in flight was finished, then saved
    assert json.loads(out.strip().splitlines()[-1])["stopped_by"] == sig.name
    assert f"stopped by {sig.name} at step {done}: run the same command again to resume" in err
    assert "Traceback" not in err
    # and the next launch resumes from there
    run_train(demo_data, run, f"max_steps={done + 2}", "val_every=5000")
    assert [m["step"] for m in metrics(run)] == list(range(done + 2))


def test_a_stop_signal_during_start_up_is_kept(demo_data, tmp_path):
    """Slurm may warn of a preemption while a job is still starting: the rank keeps the signal and stops before
    its first step, with nothing new to save (exit 75: the next start resumes). (torchrun's workers start
    with SIGUSR2 ignored, as this one does.)"""
    run = tmp_path / "run"
    cmd = train_cmd(demo_data, run)
    cmd[cmd.index("training.train")] = "cluster.worker"
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=dict(train_env(), CLUSTER_EXIT_DIR=str(tmp_path / "exits")),
        preexec_fn=lambda: signal.signal(signal.SIGUSR2, signal.SIG_IGN),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.6)  # the interpreter is up; torch is still being imported
    assert not (run / "config.json").exists(), "the run started too fast to test its start-up"
    proc.send_signal(signal.SIGUSR2)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == REQUEUE, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["stopped_by"] == "SIGUSR2"
    trained = (run / "metrics.jsonl").read_text() if (run / "metrics.jsonl").exists() else ""
    assert ck.latest_checkpoint(str(run)) is None and not trained.strip()  # not one step
    assert json.loads((tmp_path / "exits" / "rank_00000.json").read_text())["exit_code"] == REQUEUE


def test_a_stop_signal_in_the_first_second_of_a_plain_training_process_is_kept(demo_data, tmp_path):
    """`python -m training.train` itself, signalled while it imports torch: exit 75, not killed."""
    run = tmp_path / "run"
    proc = subprocess.Popen(
        train_cmd(demo_data, run),
        cwd=REPO,
        env=train_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.4)  # the interpreter is up; torch is still being imported
    proc.send_signal(signal.SIGUSR2)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == REQUEUE, err[-3000:]
    assert "stopped by SIGUSR2 at step 0: run the same command again to resume" in err


def test_missing_data_fails_before_anything_is_written(tmp_path):
    p = run_train(tmp_path / "nodata", tmp_path / "run", expect=BAD_INPUT)
    assert "no train shards" in p.stderr and not (tmp_path / "run").exists()


def test_bad_config_fails_naming_the_field(tmp_path):
    p = run_train(tmp_path, tmp_path / "run", "optim.max_lr=-1", expect=BAD_INPUT)
    assert "optim.max_lr" in p.stderr


def test_a_kernel_switch_that_cannot_run_here_is_one_line_before_anything_runs(demo_data, tmp_path):
    import os

    env = {k: v for k, v in train_env().items() if k != "TRITON_INTERPRET"}  # a plain CPU machine
    p = subprocess.run(
        train_cmd(demo_data, tmp_path / "run", "train.fused_add_layernorm=true"),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == BAD_INPUT, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1].startswith("error: train.fused_add_layernorm: ")
    assert "Traceback" not in p.stderr and not os.path.exists(tmp_path / "run")


@pytest.mark.slow
def test_compile_flag_keeps_losses_val_and_sampling(demo_data, tmp_path):
    run_train(demo_data, tmp_path / "eager", "max_steps=3", "val_every=2")
    p = run_train(
        demo_data,
        tmp_path / "compiled",
        "max_steps=3",
        "val_every=2",
        "compile=true",
        "sample_every=2",
    )
    a, b = metrics(tmp_path / "eager"), metrics(tmp_path / "compiled")
    for r1, r2 in zip(a, b):
        assert r1["loss"] == pytest.approx(r2["loss"], abs=1e-4)
        assert r1.get("val_loss", 0) == pytest.approx(r2.get("val_loss", 0), abs=1e-4)
    assert "sample step 2:" in p.stdout and (tmp_path / "compiled" / "samples.jsonl").exists()


@pytest.mark.slow
def test_the_fast_recipe_compiles_and_the_compiled_step_learns_what_the_eager_one_learns(
    demo_data, tmp_path
):
    """Every switch of the fast recipe and the two it leaves off, under torch.compile: a graph break or a
    tracing error in one of them shows here, on a CPU, before a GPU is spent on it."""
    switches = [*FAST_RECIPE, "model.value_embeds=1", "model.unet_skips=true", "max_steps=3"]
    run_train(demo_data, tmp_path / "eager", *switches)
    run_train(demo_data, tmp_path / "compiled", *switches, "compile=true")
    for r1, r2 in zip(metrics(tmp_path / "eager"), metrics(tmp_path / "compiled"), strict=True):
        assert r1["loss"] == pytest.approx(r2["loss"], abs=1e-4)


def test_missing_tokenizer_files_fail_at_start_when_sampling_is_on(demo_data, tmp_path):
    env = dict(train_env(), TIKTOKEN_CACHE_DIR=str(tmp_path / "empty-cache"), HOME=str(tmp_path))
    p = subprocess.run(
        train_cmd(demo_data, tmp_path / "run", "sample_every=2"),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == BAD_INPUT and "common.tokenizer stage" in p.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
