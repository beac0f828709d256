"""Heartbeats and the hang detector (common/heartbeat.py): real files, a clock the test moves; NCCL's flight
recorder settings. A frozen rank cancelled and resubmitted by the flow: tests/e2e/test_flows.py and
test_local_ranks.py."""

import itertools
import json
import time

from common import store
from common.heartbeat import HangDetector, HangRules, HeartbeatWriter, read_heartbeats
from common.layout import RunDir

RULES = HangRules(factor=10, floor_s=60, startup_s=600, silent_s=30)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


_BEATS = itertools.count(1)


def beat(run, rank, step, world=2, host=None, phase="step", step_s=0.5):
    store.write_json(
        run.heartbeat(rank),
        {
            "rank": rank,
            "world": world,
            "host": host or f"node{rank}",
            "beat": next(_BEATS),  # every write differs, as a live writer's do
            "step": step,
            "phase": phase,
            "step_s": step_s,
            "process": "p",
            "pid": 1,
            "time": time.time(),
        },
    )


def test_a_job_that_keeps_stepping_is_never_hung_and_one_that_stops_is_named_with_its_silent_rank(
    tmp_path,
):
    run, clock = RunDir(str(tmp_path)), Clock()
    det = HangDetector(run, RULES, clock=clock)
    for step in range(1, 40):  # 39 x 20 s = 13 min of steady progress, far past every window
        clock.now += 20
        beat(run, 0, step)
        beat(run, 1, step)
        assert det.check() is None
    # rank 1 froze (SIGSTOP) after step 39: it stops beating; rank 0 waits in the collective, beating on
    for _ in range(2):
        clock.now += 25
        beat(run, 0, 39)
        assert det.check() is None  # 50 s: inside the 60 s floor
    clock.now += 25
    beat(run, 0, 39)
    hang = det.check()
    assert hang is not None and hang.step == 39 and hang.silent == ["node1:1"]
    assert hang.message.startswith(
        "hang at step 39 (step), silent ranks: node1:1; no new step for 75 s"
    )


def test_progress_says_how_far_how_fast_and_which_rank_is_furthest_behind(tmp_path):
    run, clock = RunDir(str(tmp_path)), Clock()
    det = HangDetector(run, RULES, clock=clock)
    beat(run, 0, 12, step_s=0.31)
    beat(run, 1, 12, step_s=0.33)
    det.check()
    assert det.progress() == (
        "step 12 (step), 0.33 s/step, 2/2 ranks beating; all at that step, the oldest beat 0 s ago"
    )
    clock.now += 40
    beat(run, 0, 15, step_s=0.31)
    det.check()
    assert det.progress() == (
        "step 15 (step), 0.33 s/step, 2/2 ranks beating; rank furthest behind: node1:1 at "
        "step 12, last beat 40 s ago"
    )


def test_progress_names_the_rank_with_the_most_busy_time_when_the_ranks_report_it(tmp_path):
    """Every rank's step lasts as long as the slowest rank's under DDP; busy time (training/telemetry.py) differs."""
    run, clock = RunDir(str(tmp_path)), Clock()
    det = HangDetector(run, RULES, clock=clock)
    for rank, busy in enumerate([0.20, 0.21, 0.29, 0.20]):
        store.write_json(
            run.heartbeat(rank),
            {
                "rank": rank,
                "world": 4,
                "host": f"node{rank // 2}",
                "beat": 1,
                "step": 40,
                "phase": "step",
                "step_s": 0.3,
                "busy_s": busy,
            },
        )
    det.check()
    assert det.progress() == (
        "step 40 (step), 0.30 s/step, 4/4 ranks beating; all at that step, the oldest beat "
        "0 s ago; slowest rank: node1:2 (busy 0.29 s/step, median rank 0.20 s)"
    )


def test_the_window_grows_with_the_runs_own_step_time(tmp_path):
    run, clock = RunDir(str(tmp_path)), Clock()
    det = HangDetector(run, RULES, clock=clock)
    beat(
        run, 0, 5, world=1, step_s=30.0
    )  # slow steps: window = 10 x 30 s = 300 s, above the 60 s floor
    assert det.check() is None
    clock.now += 290
    beat(run, 0, 5, world=1, step_s=30.0)
    assert det.check() is None
    clock.now += 20
    beat(run, 0, 5, world=1, step_s=30.0)
    hang = det.check()
    assert (
        hang is not None and "window 300 s" in hang.message and "every rank beating" in hang.message
    )


def test_a_job_that_never_reaches_its_first_step_is_caught_by_the_startup_timeout(tmp_path):
    run, clock = RunDir(str(tmp_path)), Clock()
    det = HangDetector(run, RULES, clock=clock)
    assert det.check() is None  # queued: no clock runs yet
    clock.now += 5000
    assert det.check() is None
    det.started()  # the job is running
    clock.now += 599
    beat(run, 0, None, phase="starting")  # compiling: no step yet, and not a hang
    assert det.check() is None
    clock.now += 2
    hang = det.check()
    assert hang is not None and hang.step is None
    assert hang.message.startswith(
        "hang before the first step (starting), silent ranks: ?:1 (never beat)"
    )


def test_an_earlier_submissions_heartbeats_count_only_once_rewritten(tmp_path):
    run, clock = RunDir(str(tmp_path)), Clock()
    beat(run, 0, 77, world=1)  # left by the submission before
    det = HangDetector(run, RULES, clock=clock)
    det.started()
    clock.now += 500
    assert det.check() is None  # neither progress nor a hang at step 77: that was another job
    clock.now += 200
    hang = det.check()
    assert hang is not None and hang.message.startswith(
        "hang before the first step (no heartbeat), no rank has"
    )


def test_the_writer_beats_from_its_own_thread_with_the_loops_progress(tmp_path):
    run = RunDir(str(tmp_path))
    w = HeartbeatWriter(run, rank=3, world=4, interval_s=0.05).start()
    try:
        time.sleep(0.2)
        first = read_heartbeats(run)[3]
        assert first["phase"] == "starting" and first["step"] is None and first["world"] == 4
        w.progress(12, 0.25)
        w.phase("checkpoint")
        time.sleep(0.2)
        rec = read_heartbeats(run)[3]
        assert rec["step"] == 12 and rec["step_s"] == 0.25 and rec["phase"] == "checkpoint"
        assert rec["beat"] > first["beat"] and rec["process"] == first["process"]
    finally:
        w.stop()
    assert json.loads((tmp_path / "heartbeats" / "rank-00003.json").read_text())["rank"] == 3


def test_a_record_in_another_ranks_file_is_no_ones_heartbeat(tmp_path):
    """Rank 0's file claiming rank 1 would stand in for rank 1, whose own beats (or silence) decide a hang."""
    run = RunDir(str(tmp_path))
    beats = tmp_path / "heartbeats"
    beats.mkdir()
    (beats / "rank-00000.json").write_text(json.dumps({"rank": 1, "world": 2, "pid": 7}))
    (beats / "rank-00001.json").write_text(json.dumps({"rank": 1, "world": 2, "pid": 8}))
    (beats / "rank-x.json").write_text(json.dumps({"rank": 0, "world": 2, "pid": 9}))
    assert {r: b["pid"] for r, b in read_heartbeats(run).items()} == {1: 8}


def test_a_job_requeued_inside_slurm_gets_its_startup_allowance_again(tmp_path):
    run, clock = RunDir(str(tmp_path)), Clock()
    det = HangDetector(run, RULES, owns=lambda rec: rec.get("process") == "p", clock=clock)
    det.started()
    beat(run, 0, 40, world=1)
    assert det.check() is None
    det.paused()  # preempted: REQUEUED, then PENDING for an hour
    clock.now += 3600
    det.paused()
    det.started()  # running again: the old heartbeat (step 40) is history until the new process rewrites it
    clock.now += (
        500  # compiling again, past the 60 s step window but inside the 600 s start-up allowance
    )
    assert det.check() is None
    beat(run, 0, None, world=1, phase="starting")
    assert det.check() is None
    clock.now += 200
    hang = det.check()
    assert hang is not None and hang.message.startswith("hang before the first step (starting)")


def test_nccl_flight_recorder_dumps_land_in_the_run_directory_one_folder_per_job(
    tmp_path, monkeypatch
):
    from training.distributed import flight_recorder_env

    monkeypatch.setenv("SLURM_JOB_ID", "812")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    env = flight_recorder_env(str(tmp_path / "run"))
    assert env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1" and int(env["TORCH_FR_BUFFER_SIZE"]) > 0
    assert env["TORCH_FR_DUMP_TEMP_FILE"] == str(
        tmp_path / "run" / "nccl-traces" / "812-2" / "rank_"
    )
    # An object-store run directory cannot take files from NCCL: they go next to the job's exit records.
    monkeypatch.setenv("CLUSTER_EXIT_DIR", str(tmp_path / "slurm" / "exits" / "812_2"))
    assert flight_recorder_env("s3://bucket/runs/x")["TORCH_FR_DUMP_TEMP_FILE"] == str(
        tmp_path / "slurm" / "exits" / "812_2" / "nccl-traces" / "rank_"
    )


def test_time_the_store_does_not_answer_is_not_counted_as_a_quiet_job_and_is_said(
    tmp_path, monkeypatch
):
    """A store outage stalls the ranks' writes and the reader's reads alike: replacing the job would not bring
    the store back, so the detector waits for it and says so. (The store's failure is simulated here, with the
    clock it would have cost; a real outage, S3 behind a cut relay: bench/fault_soak.py --store s3 and
    tests/e2e/test_train_s3.py.)"""
    run, clock = RunDir(str(tmp_path)), Clock()
    det = HangDetector(run, RULES, clock=clock)
    beat(run, 0, 5, world=1)
    assert det.check() is None
    real_listdir = store.listdir

    def unreachable(url):
        clock.now += 40  # each read waits out its deadline
        raise OSError("Read timeout on endpoint URL: http://store:9000/bucket")

    monkeypatch.setattr(store, "listdir", unreachable)
    for _ in range(5):  # 200 s without an answer, far past the 60 s window
        assert det.check() is None
    notes = det.take_notes()
    assert len(notes) == 1 and "the store did not answer (Read timeout on endpoint URL" in notes[0]

    def slow(url):  # the store answers again, after one more slow read
        clock.now += 20
        return real_listdir(url)

    monkeypatch.setattr(store, "listdir", slow)
    assert det.check() is None  # the job's step did not move, but the store, not the job, was quiet
    assert det.take_notes() == [
        "the store answered again after 220 s: that time is not counted against the job"
    ]
    monkeypatch.setattr(store, "listdir", real_listdir)
    clock.now += 50
    assert det.check() is None  # 50 s of seen quiet: inside the window
    clock.now += 20
    hang = det.check()  # 70 s of seen quiet: a hang after all, and it is said as one
    assert hang is not None and hang.step == 5 and "no new step for 70 s" in hang.message
    assert det.take_notes() == []


def test_a_read_slower_than_its_limit_counts_as_time_without_an_answer(tmp_path, monkeypatch):
    run, clock = RunDir(str(tmp_path)), Clock()
    det = HangDetector(run, RULES, clock=clock)
    beat(run, 0, 5, world=1)
    det.check()
    real_listdir = store.listdir

    def slow(url):
        clock.now += 90  # one read that took 90 s, then answered
        return real_listdir(url)

    monkeypatch.setattr(store, "listdir", slow)
    assert det.check() is None
    assert det.take_notes() == [
        "the store answered again after 90 s: that time is not counted against the job"
    ]
