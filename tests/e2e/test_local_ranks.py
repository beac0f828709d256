"""The flow with several ranks on one machine (executor=local, nproc=2: torchrun --standalone over gloo), as on
one 8-GPU node: a clean stop, a crash, a hang and a divergence end as they do with one rank and on Slurm, read
from each rank's exit record, not from torchrun's exit code (1 whenever any rank exits non-zero)."""

import asyncio
import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest
from helpers import fast_run, read_jsonl
from prefect import flow

from common.process_tree import descendants
from flows.executors import LocalTrainingExecutor
from flows.params import PretrainParams
from flows.pretrain import pretrain, run_pretrain

# the flow tests' run on two ranks: each rank's share of the batch and of the validation tokens is whole
FLOW_FAST = fast_run(6, val_every=3, checkpoint_every=3, val_tokens=128)


@pytest.fixture(scope="module")
def shards(demo_data):
    return demo_data


def _params(d: Path, shards: str, **kw) -> PretrainParams:
    kw = {"overrides": FLOW_FAST, **kw}
    return PretrainParams(
        store=str(d / "store"),
        run_name="t",
        data=shards,
        nproc=2,
        eval_tasks=[],
        poll_seconds=0.5,
        backoff_seconds=0,
        **kw,
    )


def _run(d: Path) -> Path:
    return d / "store" / "runs" / "t"


def _trace(d: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in read_jsonl(_run(d) / "metrics.jsonl")]


def _rank_pid(torchrun_pid: int, rank: int, timeout: float = 60) -> int:
    """The pid of one rank torchrun started (each rank runs in a session of its own)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for pid in descendants(torchrun_pid):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"cluster.worker" in cmd and f"RANK={rank}".encode() in env:
                return pid
        time.sleep(0.05)
    raise TimeoutError(f"no rank {rank} under torchrun {torchrun_pid}")


def _wait_for_checkpoint(run: Path, step: int) -> None:
    manifest = run / "checkpoints" / f"step_{step:06d}" / "manifest.json"
    deadline = time.time() + 180
    while not manifest.exists():
        assert time.time() < deadline, f"no checkpoint of step {step} within 180 s"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def uninterrupted(prefect_server, shards, tmp_path_factory):
    d = tmp_path_factory.mktemp("two-ranks")
    result = asyncio.run(pretrain(_params(d, shards)))
    assert result["submissions"] == 1 and result["final_step"] == 6
    assert read_jsonl(_run(d) / "submissions.jsonl")[0]["state"] == "completed"
    return _trace(d)


def test_two_local_ranks_that_stop_with_a_checkpoint_are_resubmitted_not_failed(
    uninterrupted, shards, tmp_path
):
    result = asyncio.run(
        pretrain(_params(tmp_path, shards, overrides=[*FLOW_FAST, "stop_after_steps=2"]))
    )
    assert result["final_step"] == 6
    subs = read_jsonl(_run(tmp_path) / "submissions.jsonl")
    assert [(s["state"], s["start_step"], s["end_step"]) for s in subs] == [
        ("requeue", 0, 2),
        ("requeue", 2, 4),
        ("completed", 4, 6),
    ]
    assert (
        subs[0]["reason"] == "stopped with a checkpoint (exit 75)" and subs[0]["next"] == "resubmit"
    )
    assert _trace(tmp_path) == uninterrupted  # bit-exact resume on the same world size


class SignalRankOne(LocalTrainingExecutor):
    """Rank 1 alone, in the first submission, signalled after the step-3 checkpoint: SIGKILL is a rank that
    dies (the OOM killer, a segfault), SIGSTOP one that hangs (rank 0 then waits in its next collective)."""

    def __init__(self, sig: signal.Signals):
        super().__init__(nproc=2)
        self.sig = sig

    def submit(self, preset, overrides, run, number, exclude=()):
        submission = super().submit(preset, overrides, run, number, exclude)
        if number == 1:
            pid = _rank_pid(submission.proc.pid, 1)
            _wait_for_checkpoint(Path(run.url), 3)
            os.kill(pid, self.sig)
        return submission


def test_a_killed_local_rank_fails_the_submission_naming_it_and_the_run_resumes(
    uninterrupted, shards, tmp_path
):

    @flow(name="pretrain-gpt2-killed-rank")
    async def with_killed_rank(params: PretrainParams):
        return await run_pretrain(params, SignalRankOne(signal.SIGKILL))

    result = asyncio.run(with_killed_rank(_params(tmp_path, shards)))
    assert result["submissions"] == 2 and result["final_step"] == 6
    subs = read_jsonl(_run(tmp_path) / "submissions.jsonl")
    assert (
        subs[0]["state"] == "failed" and subs[0]["next"] == "resubmit" and subs[0]["end_step"] == 3
    )
    assert "rank 1 ended without a record (killed" in subs[0]["reason"], subs[0]
    assert subs[1]["start_step"] == 3 and subs[1]["state"] == "completed"
    assert _trace(tmp_path) == uninterrupted


def test_a_frozen_local_rank_is_found_by_its_heartbeats_and_the_run_resumes(
    uninterrupted, shards, tmp_path
):

    @flow(name="pretrain-gpt2-frozen-rank")
    async def with_frozen_rank(params: PretrainParams):
        return await run_pretrain(params, SignalRankOne(signal.SIGSTOP))

    fast = [*FLOW_FAST, "train.heartbeat_seconds=0.2"]
    result = asyncio.run(
        with_frozen_rank(
            _params(tmp_path, shards, overrides=fast, hang_floor_s=3, startup_timeout_s=60)
        )
    )
    assert result["submissions"] == 2 and result["final_step"] == 6
    subs = read_jsonl(_run(tmp_path) / "submissions.jsonl")
    assert subs[0]["state"] == "hung" and subs[0]["next"] == "resubmit", subs[0]
    # the heartbeats of both ranks are this submission's (the ranks are torchrun's children, not its group)
    assert re.search(
        rf"silent ranks: {re.escape(socket.gethostname())}:1; no new step for ", subs[0]["reason"]
    ), subs[0]
    assert subs[1]["state"] == "completed"
    assert _trace(tmp_path) == uninterrupted


def test_two_local_ranks_that_diverge_are_rolled_back_past_the_data(
    prefect_server, shards, tmp_path
):
    nine = [*FLOW_FAST, "max_steps=9", "max_skips=3"]
    result = asyncio.run(
        pretrain(_params(tmp_path, shards, overrides=[*nine, 'fault_batches=["4:7"]']))
    )
    assert result["final_step"] == 9 and result["submissions"] == 2
    subs = read_jsonl(_run(tmp_path) / "submissions.jsonl")
    assert [(s["state"], s["next"]) for s in subs] == [
        ("diverged", "rollback"),
        ("completed", "done"),
    ]
    assert subs[0]["diverged"] == {
        "steps": [4, 6],
        "batches": "4:7",
        "reasons": ["non-finite loss"],
    }
    rollback = read_jsonl(_run(tmp_path) / "rollbacks.jsonl")
    assert [(r["skip"], r["resume_step"]) for r in rollback] == [("4:7", 3)]
    assert [
        m.get("data_batch", m["step"]) for m in read_jsonl(_run(tmp_path) / "metrics.jsonl")
    ] == [0, 1, 2, 3, 7, 8, 9, 10, 11]
