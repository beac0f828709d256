"""A run directory is never written by two processes, never resumed on other data, and its history is never
erased: real `python -m training.train` processes against a local run directory (test_train_s3.py does the
same on S3)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from helpers import REPO, losses, metrics, run_train, train_cmd, train_env, wait_for_steps

from common import store
from common.exit_codes import BAD_INPUT, FAILED, REQUEUE
from common.lease import Lease
from common.shards import parse_name, write_manifest, write_shard


def _copy_data(src, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _start(data, run, *extra):
    return subprocess.Popen(
        train_cmd(data, run, *extra),
        cwd=REPO,
        env=train_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_second_trainer_on_the_same_run_directory_stops_naming_the_first(demo_data, tmp_path):
    run = tmp_path / "run"
    first = _start(demo_data, run, "max_steps=100000", "val_every=100000")
    try:
        wait_for_steps(run, 2)
        p = run_train(demo_data, run, "max_steps=100000", expect=BAD_INPUT)
        assert f"is in use by trainer on {os.uname().nodename} (pid {first.pid}" in p.stderr, (
            p.stderr[-2000:]
        )
        assert "Traceback" not in p.stderr
        assert first.poll() is None  # the first one was not disturbed...
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == REQUEUE
    finally:
        first.kill()
    steps = [m["step"] for m in metrics(run)]
    assert steps == list(
        range(len(steps))
    )  # ...and its metrics were not interleaved with another writer's
    assert not (run / "leases" / "trainer.json").exists()  # released at exit
    run_train(
        demo_data, run, f"max_steps={len(steps) + 2}", "val_every=100000"
    )  # then the next one may go on


def test_a_lease_left_by_a_dead_process_or_gone_stale_is_taken_over(demo_data, tmp_path):
    run = tmp_path / "run"
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs, on this host
    store.write_json(
        str(run / "leases" / "trainer.json"),
        {
            "owner": "trainer",
            "host": os.uname().nodename,
            "pid": dead.pid,
            "token": "x",
            "renewed": time.time(),
            "ttl_s": 60,
        },
    )
    p = run_train(demo_data, run)
    assert "taking over the lease of trainer" in p.stderr
    # another host's lease that has not been renewed for longer than its TTL: its holder died there
    store.write_json(
        str(run / "leases" / "trainer.json"),
        {
            "owner": "trainer",
            "host": "elsewhere",
            "pid": 1,
            "token": "y",
            "renewed": time.time() - 600,
            "ttl_s": 60,
        },
    )
    p = run_train(demo_data, run, "max_steps=10")
    assert "taking over the lease of trainer on elsewhere" in p.stderr


def test_a_live_lease_on_another_host_is_respected(demo_data, tmp_path):
    run = tmp_path / "run"
    other = Lease(str(run / "leases" / "trainer.json"), "trainer, Slurm job 77", ttl_s=2)
    other._record = lambda: {
        **Lease._record(other),
        "host": "gpu-node-7",
    }  # as if it ran on another node
    other.acquire()
    try:
        p = run_train(demo_data, run, "lease_ttl_s=2", expect=BAD_INPUT)
        assert "is in use by trainer, Slurm job 77 on gpu-node-7" in p.stderr
        assert not (run / "metrics.jsonl").exists()
    finally:
        other.release()


def test_a_trainer_whose_lease_is_taken_stops_without_writing(demo_data, tmp_path):
    run = tmp_path / "run"
    proc = _start(
        demo_data,
        run,
        "max_steps=100000",
        "val_every=100000",
        "checkpoint_every=5",
        "lease_ttl_s=1",
    )
    try:
        wait_for_steps(run, 3)
        intruder = {
            "owner": "trainer (a manual run)",
            "host": "laptop",
            "pid": 1,
            "token": "theirs",
            "renewed": time.time(),
            "ttl_s": 60,
        }
        deadline = time.time() + 60
        while (
            proc.poll() is None and time.time() < deadline
        ):  # (again, should a renewal race our write)
            store.write_json(str(run / "leases" / "trainer.json"), intruder)
            time.sleep(0.1)
        code = proc.wait(timeout=60)
        _, err = proc.communicate()
    finally:
        proc.kill()
    assert code == FAILED and "was taken by trainer (a manual run) on laptop" in err, err[-2000:]
    lines = len(metrics(run))
    time.sleep(1)
    assert (
        len(metrics(run)) == lines
        and json.loads((run / "leases" / "trainer.json").read_text())["token"] == "theirs"
    )


def test_resume_on_other_data_is_refused_unless_asked(demo_data, tmp_path):
    data = _copy_data(demo_data, tmp_path / "data")
    run = tmp_path / "run"
    run_train(data, run, "stop_after_steps=3", expect=REQUEUE)
    # the same shards under another URL: the same data, resumed as usual
    moved = _copy_data(data, tmp_path / "moved")
    run_train(moved, run, "stop_after_steps=1", expect=REQUEUE)
    # other shards under the same names, with the same token counts, and a manifest that lists them
    for shard in Path(data).glob("*_train_*.npy"):
        np.save(shard, np.load(shard)[::-1].copy())
    shards = sorted(Path(data).glob("*.npy"), key=lambda f: parse_name(f.name)[1])
    write_manifest(data, [write_shard(data, i, np.load(f)) for i, f in enumerate(shards)])
    before = (run / "metrics.jsonl").read_text()
    p = run_train(data, run, expect=BAD_INPUT)
    assert "was trained on other data" in p.stderr and "data.resume_on_other_data=true" in p.stderr
    assert (run / "metrics.jsonl").read_text() == before  # nothing was touched
    p = run_train(data, run, "resume_on_other_data=true")
    assert (
        "resuming would silently change the token stream (data.resume_on_other_data=true)"
        in p.stderr
    )


def test_a_run_whose_checkpoints_all_fail_is_not_restarted_over_its_history(demo_data, tmp_path):
    run = tmp_path / "run"
    run_train(demo_data, run, "checkpoint_every=4")
    for blob in run.glob("checkpoints/*/model.safetensors"):
        data = bytearray(blob.read_bytes())
        data[-1] ^= 0xFF
        blob.write_bytes(bytes(data))  # bit rot in every checkpoint
    before = (run / "metrics.jsonl").read_text()
    p = run_train(demo_data, run, "max_steps=12", expect=BAD_INPUT)
    assert "holds 2 complete checkpoint(s) (steps [4, 8]) and none of them loads" in p.stderr
    assert "Traceback" not in p.stderr and (run / "metrics.jsonl").read_text() == before


def test_an_incomplete_first_checkpoint_is_not_history(demo_data, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000004").mkdir(
        parents=True
    )  # killed while writing its first checkpoint
    (run / "checkpoints" / "step_000004" / "model.safetensors").write_bytes(b"partial")
    run_train(demo_data, run)
    assert [m["step"] for m in metrics(run)] == list(range(8))


def test_a_truncated_shard_far_down_the_list_is_found_at_start(demo_data, tmp_path):
    data = _copy_data(demo_data, tmp_path / "data")
    last = sorted(Path(data).glob("*_train_*.npy"))[-1]
    last.write_bytes(last.read_bytes()[:-100])
    p = run_train(data, tmp_path / "run", expect=BAD_INPUT)
    assert f"shard {last.name} is" in p.stderr and "truncated" in p.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_temporary_files_of_killed_writes_are_removed_at_start(demo_data, tmp_path):
    run = tmp_path / "run"
    run_train(demo_data, run, "checkpoint_every=4")
    stale = [
        run / ".metrics.jsonl.0123456789abcdef0123456789abcdef.tmp",
        run / "checkpoints" / "step_000004" / ".optimizer.pt.fedcba9876543210fedcba9876543210.tmp",
    ]
    for f in stale:
        f.write_bytes(b"half a write")
        os.utime(f, (time.time() - 3600, time.time() - 3600))
    fresh = (
        run / ".config.json.00000000000000000000000000000000.tmp"
    )  # a write going on right now: left alone
    fresh.write_bytes(b"x")
    p = run_train(demo_data, run, "max_steps=10")
    assert not any(f.exists() for f in stale) and fresh.exists()
    assert "left by a killed write" in p.stderr


def test_a_trainer_waiting_for_a_holder_elsewhere_says_so_and_stops_on_sigterm(demo_data, tmp_path):
    """A lease dated in the future with a TTL of years (a clock gone wrong, or a hand-edited file): the trainer
    says what it waits for, and a stop signal ends the wait cleanly (75, one line), as a preemption would."""
    run = tmp_path / "run"
    store.write_json(
        str(run / "leases" / "trainer.json"),
        {
            "owner": "trainer",
            "host": "elsewhere",
            "pid": 1,
            "token": "y",
            "renewed": time.time() + 3600,
            "ttl_s": 1e9,
        },
    )
    proc = subprocess.Popen(
        train_cmd(demo_data, run), cwd=REPO, env=train_env(), stderr=subprocess.PIPE, text=True
    )
    deadline, said = time.time() + 120, ""
    while "waiting up to" not in said:
        assert time.time() < deadline and proc.poll() is None, said
        said += proc.stderr.readline()
    proc.send_signal(signal.SIGTERM)
    err = said + proc.communicate(timeout=60)[1]
    assert proc.returncode == REQUEUE, err[-2000:]
    assert "stopped by SIGTERM while waiting for the lease of" in err and "Traceback" not in err
    assert not (run / "metrics.jsonl").exists()


def test_a_write_killed_a_moment_ago_is_removed_at_the_next_start(demo_data, tmp_path):
    """A SIGKILL in the middle of writing a checkpoint file, and training started again at once (as the flow
    resubmits): the killed writer's temporary is removed though it is seconds old (its process is gone)."""
    run = tmp_path / "run"
    run_train(demo_data, run, "checkpoint_every=4")
    folder = run / "checkpoints" / "step_000004"
    code = "import sys; from common import store; store.write_bytes(sys.argv[1], bytes(1 << 30))"
    writer = subprocess.Popen([sys.executable, "-c", code, str(folder / "optimizer.pt")], cwd=REPO)
    deadline = time.time() + 60
    while not list(folder.glob(".optimizer.pt.*.tmp")):
        assert writer.poll() is None and time.time() < deadline, "the write never started"
        time.sleep(0.001)
    writer.kill()
    writer.wait()
    [temporary] = list(folder.glob(".optimizer.pt.*.tmp"))  # half a write, under its temporary name
    p = run_train(demo_data, run, "max_steps=10")
    assert not temporary.exists() and "left by a killed write" in p.stderr


def test_a_loss_trace_is_the_same_with_the_lease_renewing(demo_data, tmp_path):
    """The lease's renewal thread writes to the run directory during training without changing it."""
    run_train(demo_data, tmp_path / "a")
    run_train(demo_data, tmp_path / "b", "lease_ttl_s=0.2")
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_non_finite_numbers_are_refused(tmp_path):
    p = run_train(tmp_path, tmp_path / "run", "max_lr=inf", expect=BAD_INPUT)
    assert "optim.max_lr" in p.stderr and "finite" in p.stderr
