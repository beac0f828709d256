"""Training with data and run directory on S3, through s3fs against moto's real S3 server (not in-process
patching): checkpoints, metrics and resume work on an object store, and a partial checkpoint is never used."""

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO, TRAIN_BASE

from common import store
from common.exit_codes import BAD_INPUT, REQUEUE
from training import checkpoint as ck


@pytest.fixture(scope="module")
def s3(s3_server):
    """The shared moto server, with this module's process set up for plain s3:// URLs and demo shards."""
    import fsspec.config
    import s3fs

    env = s3_server["env"]
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    # fsspec reads FSSPEC_* variables when it is imported; subprocesses get them from the environment
    old_conf = dict(fsspec.config.conf.get("s3", {}))
    fsspec.config.conf["s3"] = {**old_conf, "endpoint_url": s3_server["endpoint_url"]}
    s3fs.S3FileSystem.clear_instance_cache()
    s3_server["make_bucket"]("bucket")
    from data_prep import pipeline
    from data_prep.sources import DemoSource

    pipeline.build("s3://bucket/data", DemoSource(), 50_000, workers=1, progress=False)
    yield env
    fsspec.config.conf["s3"] = old_conf
    s3fs.S3FileSystem.clear_instance_cache()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _run(run, *extra, env):
    sets = [
        a
        for kv in TRAIN_BASE + ["data_url=s3://bucket/data", f"run_dir={run}", *extra]
        for a in ("--set", kv)
    ]
    return subprocess.run(
        [sys.executable, "-m", "training.train", "--config", "tiny", *sets],
        cwd=REPO,
        env=dict(os.environ, **env, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _losses(run):
    return [
        (m["step"], m["loss"])
        for m in map(json.loads, store.read_bytes(f"{run}/metrics.jsonl").decode().splitlines())
    ]


def test_train_and_resume_on_s3_bit_exact(s3, tmp_path):
    import s3fs

    straight = _run("s3://bucket/runs/straight", env=s3)
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = _run("s3://bucket/runs/split", "stop_after_steps=3", "checkpoint_every=2", env=s3)
    assert first.returncode == REQUEUE, first.stderr[-3000:]
    # a crash while writing step 4: files but no manifest; it must be ignored on resume
    fs = s3fs.S3FileSystem()
    fs.pipe_file("bucket/runs/split/checkpoints/step_000004/model.safetensors", b"partial")
    assert ck.latest_checkpoint("s3://bucket/runs/split").step == 3
    second = _run("s3://bucket/runs/split", "checkpoint_every=2", env=s3)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from s3://bucket/runs/split/checkpoints/step_000003" in second.stderr
    assert _losses("s3://bucket/runs/split") == _losses("s3://bucket/runs/straight")
    steps = ck.list_steps("s3://bucket/runs/split")
    assert steps[-1] == 8 and ck.latest_checkpoint("s3://bucket/runs/split").step == 8
    assert fs.exists("bucket/runs/split/config.json") and fs.exists("bucket/runs/split/result.json")


def test_missing_credentials_fail_early_and_clearly(s3, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        FSSPEC_S3_ENDPOINT_URL=s3["FSSPEC_S3_ENDPOINT_URL"],
        AWS_CONFIG_FILE="/nonexistent",
        AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
        AWS_EC2_METADATA_DISABLED="true",
    )
    sets = [
        a
        for kv in TRAIN_BASE + ["data_url=s3://bucket/data", "run_dir=s3://bucket/runs/nocreds"]
        for a in ("--set", kv)
    ]
    p = subprocess.run(
        [sys.executable, "-m", "training.train", "--config", "tiny", *sets],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2, p.stderr[-2000:]
    assert "s3://bucket/data" in p.stderr and "credentials" in p.stderr.lower()


def _start(run, *extra, env):
    sets = [
        a
        for kv in TRAIN_BASE + ["data_url=s3://bucket/data", f"run_dir={run}", *extra]
        for a in ("--set", kv)
    ]
    return subprocess.Popen(
        [sys.executable, "-m", "training.train", "--config", "tiny", *sets],
        cwd=REPO,
        env=dict(os.environ, **env, OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_one_writer_per_run_directory_on_s3(s3):
    import signal
    import time

    run = "s3://bucket/runs/leased"
    first = _start(run, "max_steps=100000", "val_every=100000", env=s3)
    try:
        deadline = time.time() + 120
        while not store.exists(f"{run}/metrics.jsonl") and time.time() < deadline:
            time.sleep(0.2)
        second = _run(run, env=s3)
        assert second.returncode == BAD_INPUT and f"{run} is in use by trainer" in second.stderr, (
            second.stderr[-2000:]
        )
        assert "Traceback" not in second.stderr
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == REQUEUE
    finally:
        first.kill()
    assert not store.exists(f"{run}/leases/trainer.json")
    assert _run(run, "max_steps=10", env=s3).returncode == 0  # released: the next writer goes on


def test_resume_on_other_data_and_unusable_history_are_refused_on_s3(s3):
    from common.shards import list_shards, load_shard, write_manifest, write_shard

    first = _run("s3://bucket/runs/guarded", "stop_after_steps=3", env=s3)
    assert first.returncode == REQUEUE, first.stderr[-3000:]
    # the same names and token counts, other tokens: another dataset under the same URL
    other = "s3://bucket/other-data"
    shards = list_shards("s3://bucket/data", "val") + list_shards("s3://bucket/data", "train")
    write_manifest(
        other, [write_shard(other, i, load_shard(s)[::-1].copy()) for i, s in enumerate(shards)]
    )
    p = _run("s3://bucket/runs/guarded", f"data_url={other}", env=s3)
    assert p.returncode == BAD_INPUT and "was trained on other data" in p.stderr, p.stderr[-3000:]
    # every checkpoint corrupt: refused, the history stays
    url = "s3://bucket/runs/guarded/checkpoints/step_000003/model.safetensors"
    blob = bytearray(store.read_bytes(url))
    blob[-1] ^= 0xFF
    store.write_bytes(url, bytes(blob))
    before = store.read_bytes("s3://bucket/runs/guarded/metrics.jsonl")
    p = _run("s3://bucket/runs/guarded", env=s3)
    assert p.returncode == BAD_INPUT and "none of them loads" in p.stderr, p.stderr[-3000:]
    assert store.read_bytes("s3://bucket/runs/guarded/metrics.jsonl") == before
    # a truncated shard far down the list is found before anything runs
    last = list_shards("s3://bucket/data", "train")[-1]
    store.write_bytes(f"s3://bucket/truncated/{last.name}", store.read_bytes(last.url)[:-64])
    for s in shards:
        if s.name != last.name:
            store.write_bytes(f"s3://bucket/truncated/{s.name}", store.read_bytes(s.url))
    store.write_bytes(
        "s3://bucket/truncated/manifest.json", store.read_bytes("s3://bucket/data/manifest.json")
    )
    p = _run("s3://bucket/runs/fresh", "data_url=s3://bucket/truncated", env=s3)
    assert (
        p.returncode == BAD_INPUT
        and f"shard {last.name} is" in p.stderr
        and "truncated" in p.stderr
    )
    assert not store.exists("s3://bucket/runs/fresh/metrics.jsonl")


def test_metrics_on_s3_are_rewritten_off_the_step_path_and_complete_after_a_flush(s3_env):
    """Object stores have no append: the metrics file is rewritten whole by a thread of its own (the step only
    hands it the lines), and flush() returns once the file holds every line."""
    import time

    from common.logfiles import LogFiles
    from training.metrics import MetricsLog, read_metrics

    run = s3_env["make_bucket"]("metrics") + "/run"
    m = MetricsLog(run, resume_step=0, files=LogFiles(flush_seconds=0.0))
    for step in range(5):
        m.log({"step": step, "loss": 10.0 - step})
    deadline = time.time() + 30
    while (
        len(read_metrics(run)) < 1 and time.time() < deadline
    ):  # the writer's rewrites, without a flush
        time.sleep(0.1)
    assert read_metrics(run) and read_metrics(run)[0] == {"step": 0, "loss": 10.0}
    for step in range(5, 40):
        m.log({"step": step, "loss": 1.0})
    m.flush()
    assert [r["step"] for r in read_metrics(run)] == list(range(40))


def test_samples_events_and_telemetry_on_s3_reach_the_store_at_checkpoints_and_at_exit(s3):
    """None of rank 0's growing files is written from the step on an object store: what the loop logged before a
    checkpoint is on S3 once the checkpoint is, and everything once the process is done, across a resume."""
    import signal
    import time

    run = "s3://bucket/runs/files"
    extra = [
        "sample_every=2",
        "checkpoint_every=4",
        "fault_steps=[1]",
    ]  # a skipped update at step 1: an event
    first = _start(run, *extra, "max_steps=100000", "val_every=100000", env=s3)
    try:
        deadline = time.time() + 120
        while (
            not store.exists(f"{run}/checkpoints/step_000004/manifest.json")
            and time.time() < deadline
        ):
            time.sleep(0.1)
        first.send_signal(signal.SIGKILL)  # no exit path: only what the checkpoint flushed is there
        first.wait(timeout=60)
    finally:
        first.kill()

    def lines(name):
        return [json.loads(x) for x in store.read_bytes(f"{run}/{name}").decode().splitlines()]

    assert [r["step"] for r in lines("metrics.jsonl")][:4] == [0, 1, 2, 3]
    assert [r["step"] for r in lines("samples.jsonl")] == [
        2
    ]  # step 4's sample is taken after its checkpoint
    assert [(e["event"], e["step"]) for e in lines("events.jsonl")] == [("skip", 1)]
    assert [w["step"] for w in lines("telemetry.jsonl")] == [3]
    second = _run(run, *extra, env=s3)  # resumes from step 4, to the 8 steps of the tests' runs
    assert second.returncode == 0, second.stderr[-3000:]
    assert [r["step"] for r in lines("metrics.jsonl")] == list(range(8))
    assert [r["step"] for r in lines("samples.jsonl")] == [2, 4, 6, 7]
    assert [(e["event"], e["step"]) for e in lines("events.jsonl")] == [("skip", 1)]
    assert [w["step"] for w in lines("telemetry.jsonl")] == [3, 7]
    assert store.read_json(f"{run}/result.json")["complete"]
