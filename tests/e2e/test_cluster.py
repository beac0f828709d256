"""Training jobs on a real Slurm cluster (cluster/local/slurm_cluster.sh: slurmctld + slurmd n1, n2 + slurmdbd on
this machine) through submitit and torchrun (gloo on CPU, one process per emulated node)."""

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from helpers import REPO, TRAIN_BASE, losses, release_after_requeue, run_train, wait_for_steps

from cluster.launch import RunFailed
from cluster.spec import JobSpec
from cluster.submit import main as submit_cli
from cluster.submit import reattach, sacct_state, submit
from cluster.validate import SpecError

SECRET = "s3cret-never-pickled-0xC0FFEE"
STEPS = 40


def _job_environment(mp: pytest.MonkeyPatch) -> None:
    # The job inherits this environment at run time (sbatch --export=ALL): one thread per rank on 2 cores.
    mp.setenv("OMP_NUM_THREADS", "1")
    mp.setenv("PYTHONUNBUFFERED", "1")
    mp.setenv("GPT2_TEST_SECRET", SECRET)


@pytest.fixture
def job_env(slurm_cluster, monkeypatch):
    _job_environment(monkeypatch)
    return slurm_cluster


# A learning rate at which float-level differences between 2 ranks and 1 process stay float-level for STEPS
# steps (at the tiny preset's 1e-2, a clipped gradient spike can amplify 1e-6 into 1e-2 within 60 steps: both
# trajectories are right, but they are no longer comparable step by step).
LR = "max_lr=3e-3"


def sets(data, run, *extra):
    return [
        *TRAIN_BASE,
        f"max_steps={STEPS}",
        "val_every=10",
        LR,
        f"data_url={data}",
        f"run_dir={run}",
        *extra,
    ]


def spec(folder, **kw):
    # time_min=20: with time_min < ~10 submitit counts every signal as a time-out.
    return JobSpec(**{"nodes": 2, "time_min": 20, "folder": str(folder), **kw})


def attempts(run: Path):
    return [json.loads(x) for x in (run / "attempts.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(demo_data, tmp_path_factory):
    """The same run in one plain process (same global batch)."""
    run = tmp_path_factory.mktemp("one") / "run"
    run_train(demo_data, run, f"max_steps={STEPS}", "val_every=10", LR)
    return losses(run)


@pytest.fixture(scope="module")
def two_node_job(slurm_cluster, demo_data, tmp_path_factory):
    """One 2-node job of STEPS steps with nothing going wrong; also the fault tests' reference at their world
    size. (handle, result, run directory, submitit folder)"""
    d = tmp_path_factory.mktemp("two-node")
    with pytest.MonkeyPatch.context() as mp:
        _job_environment(mp)
        handle = submit(spec(d / "slurm"), "tiny", sets(demo_data, d / "run"))
        return handle, handle.wait(timeout_s=180), d / "run", d / "slurm"


def test_two_node_job_matches_one_process_and_pickles_no_secret(two_node_job, straight):
    handle, result, run, folder = two_node_job
    assert (
        result["complete"] and result["final_step"] == STEPS and result["job_id"] == handle.job_id
    )
    assert result["checkpoint"].endswith(f"step_{STEPS:06d}")
    assert json.loads((run / "config.json").read_text())["resolved"]["world_size"] == 2
    two = losses(run)
    assert [s for s, _ in two] == list(range(STEPS))
    for (_, a), (_, b) in zip(two, straight):
        assert a == pytest.approx(b, abs=1e-5)
    assert sacct_state(handle.job_id)[0] == "COMPLETED"
    # Both emulated nodes ran a task: ranks 0 and 1 each recorded their exit.
    exits = sorted(p.name for p in (folder / "exits").rglob("rank_*.json"))
    assert exits == ["rank_00000.json", "rank_00001.json"]
    # Secrets travel in the environment, never in pickles or the job script.
    for f in folder.rglob("*"):
        if f.is_file() and f.suffix in (".pkl", ".sh", ".json"):
            assert SECRET.encode() not in f.read_bytes(), f
    # A new process can pick the job up by id.
    assert reattach(handle.job_id, str(folder)).wait(timeout_s=30) == result


def test_preempted_job_is_requeued_and_resumes_bit_exact(
    job_env, demo_data, two_node_job, tmp_path
):
    run = tmp_path / "run"
    handle = submit(spec(tmp_path / "slurm"), "tiny", sets(demo_data, run))
    wait_for_steps(run, 3)
    subprocess.run(
        ["scancel", "--signal=USR2", handle.job_id], check=True
    )  # what Slurm sends before preempting
    release_after_requeue(handle.job_id)
    result = handle.wait(timeout_s=180)
    assert result["complete"] and result["preemptions"] == 1 and result["timeouts"] == 0
    log = attempts(run)
    assert [a["event"] for a in log] == ["requeue", "completed"]
    assert (
        log[0]["reason"] == "preemption" and 3 <= log[0]["step"] < STEPS
    )  # stopped mid-run, with a checkpoint
    assert log[1]["attempt"] == 1
    assert losses(run) == losses(two_node_job[2])  # same world size on resume: exact


def test_bad_specs_are_rejected_before_sbatch(job_env, demo_data, tmp_path):
    def queued():
        return subprocess.run(
            ["squeue", "-h", "-o", "%i"], capture_output=True, text=True
        ).stdout.split()

    before = queued()
    run = tmp_path / "run"
    with pytest.raises(
        SpecError
    ) as err:  # 3 nodes: too many, and 4 micro-batches do not split over 3 ranks
        submit(spec(tmp_path, nodes=3), "tiny", sets(demo_data, run))
    assert "world size 3" in str(err.value) and "partition 'debug' has 2" in str(err.value)
    with pytest.raises(SpecError, match="at most 0 GPUs"):
        submit(
            spec(tmp_path, gpus_per_node=1, gres=False),
            "tiny",
            sets(demo_data, run, "total_batch_tokens=128"),
        )
    with pytest.raises(SpecError, match="'nope' does not exist"):
        submit(spec(tmp_path, partition="nope"), "tiny", sets(demo_data, run))
    with pytest.raises(SpecError, match="data URL .* is not readable"):
        submit(spec(tmp_path), "tiny", sets(tmp_path / "no-data", run))
    with pytest.raises(SpecError, match="invalid run config"):
        submit(spec(tmp_path), "tiny", sets(demo_data, run, "optim.max_lr=-1"))
    with pytest.raises(ValueError, match="nodez"):
        JobSpec(nodez=2)
    # The CLI says the same and exits 2.
    assert (
        submit_cli(
            [
                "--config",
                "tiny",
                "--nodes",
                "3",
                "--folder",
                str(tmp_path),
                *[a for kv in sets(demo_data, run) for a in ("--set", kv)],
            ]
        )
        == 2
    )
    assert queued() == before and not run.exists()
    assert not list(tmp_path.glob("*_submitted.pkl"))


def test_failure_reports_the_failing_rank_and_the_latest_checkpoint(job_env, tmp_path):
    # Skip submit-time checks so that the job itself meets the missing data (every rank exits 2).
    handle = submit(
        spec(tmp_path / "slurm"), "tiny", sets(tmp_path / "no-data", tmp_path / "run"), check=False
    )
    with pytest.raises(RunFailed) as err:
        handle.wait(timeout_s=120)
    msg = str(err.value)
    assert f"job {handle.job_id} ended FAILED" in msg
    assert (
        "failed first (exit 2)" in msg
        and "no train shards" in msg
        and "latest checkpoint: None" in msg
    )


def test_time_limit_requeues_stop_at_the_cap(job_env, demo_data, tmp_path):
    # time_min=5 < 10: submitit's rule (and the launcher's) treats each signal as the time limit arriving.
    run = tmp_path / "run"
    s = spec(tmp_path / "slurm", time_min=5, max_timeout_requeues=1)
    handle = submit(s, "tiny", sets(demo_data, run, "max_steps=100000", "val_every=100000"))
    wait_for_steps(run, 3)
    subprocess.run(["scancel", "--signal=USR2", handle.job_id], check=True)
    release_after_requeue(handle.job_id)
    time.sleep(1)
    wait_for_steps(run, attempts(run)[0]["step"] + 3)  # the second attempt resumed and is training
    subprocess.run(["scancel", "--signal=USR2", handle.job_id], check=True)
    with pytest.raises(RunFailed, match=r"timeout #2 exceeds the cap of 1 requeues") as err:
        handle.wait(timeout_s=180)
    assert "latest checkpoint: " in str(err.value) and "step_" in str(err.value)
    assert [(a["event"], a["reason"]) for a in attempts(run)] == [
        ("requeue", "timeout"),
        ("gave_up", "timeout"),
    ]


def test_a_controller_that_does_not_answer_is_a_clear_error_before_sbatch(
    job_env, demo_data, tmp_path, monkeypatch
):
    # The real Slurm client against a controller port where nothing listens (a dead slurmctld).
    conf = [
        ln
        for ln in Path("/etc/slurm/slurm.conf").read_text().splitlines()
        if not ln.startswith("SlurmctldPort")
    ]
    (tmp_path / "slurm.conf").write_text("\n".join(conf + ["SlurmctldPort=1"]) + "\n")
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "slurm.conf"))
    with pytest.raises(SpecError, match="Slurm controller does not answer"):
        submit(spec(tmp_path / "slurm"), "tiny", sets(demo_data, tmp_path / "run"))
    assert not (tmp_path / "slurm").exists()  # nothing was written for a job that never got queued


def test_a_frozen_rank_is_found_by_its_silence_and_the_job_cancelled(job_env, demo_data, tmp_path):
    """One rank of a 2-node job SIGSTOPped mid-run: the other waits in the all-reduce (it still beats, its
    step stands still). The watcher names the silent rank's node and cancels the job within the window."""
    import os
    import signal

    from common.heartbeat import HangRules, read_heartbeats
    from common.layout import RunDir

    run = tmp_path / "run"
    handle = submit(
        spec(tmp_path / "slurm"),
        "tiny",
        sets(demo_data, run, "max_steps=100000", "train.heartbeat_seconds=0.5"),
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        beats = read_heartbeats(RunDir(str(run)))
        if len(beats) == 2 and all((b.get("step") or 0) >= 3 for b in beats.values()):
            break
        time.sleep(0.1)
    os.kill(beats[1]["pid"], signal.SIGSTOP)  # the emulated nodes are processes of this machine
    t0 = time.time()
    with pytest.raises(RunFailed) as err:
        handle.wait(
            timeout_s=120,
            poll_s=0.5,
            hang=HangRules(factor=20, floor_s=5, startup_s=60, silent_s=3),
        )
    assert time.time() - t0 < 30  # the window, not the job's 20-minute limit
    assert f"job {handle.job_id} hung, cancelled: hang at step " in str(err.value)
    assert f"silent ranks: {beats[1]['host']}:1;" in str(err.value) and beats[1]["host"] in (
        "n1",
        "n2",
    )
    for _ in range(120):
        if sacct_state(handle.job_id)[0].startswith("CANCELLED"):
            break
        time.sleep(0.5)
    assert sacct_state(handle.job_id)[0].startswith("CANCELLED")
    # and the frozen rank is gone, not left stopped as an orphan (holding memory, a GPU, the run's lease)
    from common.process_tree import alive

    for _ in range(40):
        if not alive(beats[1]["pid"]):
            break
        time.sleep(0.25)
    assert not alive(beats[1]["pid"])


def test_a_job_whose_ranks_never_reach_their_first_step_is_caught_by_the_startup_timeout(
    job_env, demo_data, tmp_path
):
    """The rank is frozen while it is still importing (before it could write a heartbeat): nothing ever says a
    step was done, and the start-up allowance, not the job's time limit, ends it."""
    import os
    import signal

    from common.heartbeat import HangRules

    run = tmp_path / "run"
    handle = submit(
        spec(tmp_path / "slurm", nodes=1),
        "tiny",
        sets(demo_data, run, "train.heartbeat_seconds=0.5"),
    )
    marker, frozen = f"run_dir={run}".encode(), None
    deadline = time.time() + 120
    while frozen is None and time.time() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"cluster.worker" in cmd and marker in cmd:  # the rank itself, not its torchrun
                os.kill(int(pid), signal.SIGSTOP)
                frozen = int(pid)
                break
        time.sleep(0.02)
    assert frozen is not None
    t0 = time.time()
    with pytest.raises(RunFailed) as err:
        handle.wait(
            timeout_s=120,
            poll_s=0.5,
            hang=HangRules(factor=20, floor_s=5, startup_s=10, silent_s=3),
        )
    assert time.time() - t0 < 40
    assert f"job {handle.job_id} hung, cancelled: hang before the first step" in str(err.value)
    assert "no first step within 10 s of the job starting" in str(err.value)
    assert not (run / "heartbeats").exists() or not list((run / "heartbeats").iterdir())


def test_submit_cli_waits_showing_the_job_state_and_its_progress_and_prints_the_result(
    job_env, demo_data, tmp_path
):
    import re
    import sys

    run = tmp_path / "run"
    args = [a for kv in sets(demo_data, run, "train.heartbeat_seconds=0.5") for a in ("--set", kv)]
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.submit",
            "--config",
            "tiny",
            "--nodes",
            "1",
            "--time",
            "20",
            "--folder",
            str(tmp_path / "slurm"),
            *args,
            "--wait",
            "--progress-s",
            "1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    job_id, result = p.stdout.splitlines()[0], json.loads(p.stdout.splitlines()[-1])
    assert result["complete"] and result["final_step"] == STEPS and result["job_id"] == job_id
    assert f"job {job_id}: RUNNING" in p.stderr and f"job {job_id}: COMPLETED" in p.stderr
    # the ranks' last word while it runs: how far, how fast, who is behind
    assert re.search(
        rf"job {job_id}: step \d+ \([a-z/]+\), \d+\.\d\d s/step, 1/1 ranks beating; ", p.stderr
    ), p.stderr[-3000:]


def test_submit_cli_resubmits_a_hung_job_through_the_flows_policy_and_finishes_exactly(
    job_env, demo_data, straight, tmp_path
):
    """`cluster.submit --wait` without Prefect: a rank frozen mid-run is found by its silence, the job cancelled
    and resubmitted from its last checkpoint by the flow's policy, with the flow's records, and the run
    finishes with the loss trace of an uninterrupted one."""
    import os
    import signal
    import sys

    from common.heartbeat import read_heartbeats
    from common.layout import RunDir

    run = tmp_path / "run"
    extra = ("train.heartbeat_seconds=0.5", "checkpoint_every=10")
    args = [a for kv in sets(demo_data, run, *extra) for a in ("--set", kv)]
    cmd = [sys.executable, "-m", "cluster.submit", "--config", "tiny", "--nodes", "1"]
    cmd += ["--time", "20", "--folder", str(tmp_path / "slurm"), *args, "--wait"]
    cmd += ["--hang-floor-s", "5", "--backoff-s", "0", "--progress-s", "0"]
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, beat = time.time() + 120, {}
        while time.time() < deadline and (beat.get("step") or 0) < 12:
            beat = read_heartbeats(RunDir(str(run))).get(0, {})
            time.sleep(0.1)
        os.kill(beat["pid"], signal.SIGSTOP)  # the rank, a process of this machine
        out, err = p.communicate(timeout=240)
    finally:
        p.kill()
    assert p.returncode == 0, err[-3000:]
    first, second, result = (
        out.splitlines()[0],
        out.splitlines()[1],
        json.loads(out.splitlines()[-1]),
    )
    assert result["complete"] and result["final_step"] == STEPS and result["job_id"] == second
    ends = [json.loads(x) for x in (run / "submissions.jsonl").read_text().splitlines()]
    assert [(e["job_id"], e["state"], e["next"]) for e in ends] == [
        (first, "hung", "resubmit"),
        (second, "completed", "done"),
    ]
    assert ends[1]["start_step"] in (10, 20) and ends[1]["submission"] == 2
    assert f"job {first}: RUNNING" in err and f"submission 2: job {second} from step" in err
    assert json.loads((run / "job.json").read_text())["ended"] == "completed"
    assert dict(losses(run)) == dict(
        straight
    )  # resumed bit-exact: the trace of a run without the hang


def test_a_store_that_is_down_mid_run_is_waited_out_and_said_not_taken_for_a_hang(
    job_env, s3_server, demo_data, straight, tmp_path
):
    """The run's store (moto's S3 server, behind a relay that closes every connection) down for 40 s mid-run,
    under `cluster.submit --wait` with a 5 s hang floor: the ranks' writes and the watch's reads are retried
    until it is back, the watch says so when it starts, while it lasts and when it ends, and cancels and
    resubmits nothing (a new job would meet the same store); the run finishes with the loss trace of an
    uninterrupted one. A store that answers nothing at all (a partition) for 30-60 s, again and again:
    bench/fault_soak.py --store s3."""
    import os
    import sys

    import s3fs

    from bench.pausable_relay import PausableRelay

    direct = s3fs.S3FileSystem(
        key="testing",
        secret="testing",
        endpoint_url=s3_server["endpoint_url"],
        skip_instance_cache=True,
    )
    relay = PausableRelay(("127.0.0.1", int(s3_server["endpoint_url"].rsplit(":", 1)[1]))).start()
    bucket = s3_server["make_bucket"]("store-cut")
    run = f"{bucket}/runs/cut"
    env = {**os.environ, **s3_server["env"], "FSSPEC_S3_ENDPOINT_URL": relay.url}
    args = [a for kv in sets(demo_data, run, "train.heartbeat_seconds=0.5") for a in ("--set", kv)]
    cmd = [sys.executable, "-m", "cluster.submit", "--config", "tiny", "--nodes", "1"]
    cmd += ["--time", "20", "--folder", str(tmp_path / "slurm"), *args, "--wait"]
    cmd += ["--hang-floor-s", "5", "--backoff-s", "0", "--progress-s", "0"]
    p = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline, beat = time.time() + 120, {}
        while time.time() < deadline and (beat.get("step") or 0) < 1:
            try:
                beat = json.loads(direct.cat_file(f"{run}/heartbeats/rank-00000.json"))
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        relay.cut(refuse=True)
        time.sleep(40)
        relay.heal()
        out, err = p.communicate(timeout=300)
    finally:
        relay.stop()
        p.kill()
    assert p.returncode == 0, err[-3000:]
    jobs, result = out.splitlines()[:-1], json.loads(out.splitlines()[-1])
    assert len(jobs) == 1 and result["complete"] and result["final_step"] == STEPS, err[-3000:]
    # said at once (the store's retries), while it lasted (the watch's alarm) and when it ended (the hang window)
    assert re.search(r"\d\d:\d\d:\d\d the store http://127\.0\.0\.1:\d+ does not answer \(", err), (
        err
    )
    assert re.search(r"the store \(s3://store-cut/runs/cut\) has not answered for \d+ s", err), err
    assert re.search(r"the store answered again after \d+ s: that time is not counted", err), err
    assert "hung" not in err, err
    rows = [json.loads(x) for x in direct.cat_file(f"{run}/metrics.jsonl").decode().splitlines()]
    assert [(m["step"], m["loss"]) for m in rows] == straight
