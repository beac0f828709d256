"""Experiment trackers fed from the run directory: a real MLflow tracking server (SQLite backend) that the tests
start, and W&B in offline mode with its run files read back."""

import asyncio
import glob
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import FLOW_FAST, REPO, free_port, make_examples, read_jsonl, write_jsonl
from prefect import flow

from flows.executors import LocalTrainingExecutor
from flows.params import PretrainParams
from flows.pretrain import FlowFailure, pretrain, run_pretrain
from tracking.credentials import redact, take_credentials

SECRET = "tok-0123456789-secret"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` with a SQLite backend and its own artifact folder, on 127.0.0.1."""
    d = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{d}/mlflow.db",
            "--artifacts-destination",
            str(d / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=open(d / "server.log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(
                    f"mlflow server did not start: {(d / 'server.log').read_text()[-2000:]}"
                )
            time.sleep(0.5)
    yield url
    os.killpg(
        proc.pid, signal.SIGKILL
    )  # the server and its helpers; nothing of it outlives the tests
    proc.wait(timeout=30)


class Proxy:
    """A TCP relay in front of the tracker: `down()` makes the tracker unreachable (connections refused, the
    open ones cut) without touching the server, `up()` brings it back on the same port."""

    def __init__(self, target: int):
        self.target, self.port = target, free_port()
        self.conns: list[socket.socket] = []
        self.up()

    def up(self):
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def down(self):
        self.listener.shutdown(
            socket.SHUT_RDWR
        )  # wakes the accept() of its thread: close() alone would not
        self.listener.close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        self.conns.clear()

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _params(tmp_path, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    hs = write_jsonl(tmp_path / "hs.jsonl", make_examples(4))
    return PretrainParams(
        store=str(tmp_path / "store"),
        run_name="t",
        hellaswag_data=hs,
        poll_seconds=0.3,
        backoff_seconds=0,
        **{"tracker_interval_s": 0.5, "tracker_finish_timeout_s": 60, **kw},
    )


def _lines(path) -> int:
    return len(open(path).read().splitlines()) if os.path.exists(path) else 0


class RequeueThenKill(LocalTrainingExecutor):
    """With `stop_after_steps=4`, submission 1 leaves with a checkpoint (exit 75: a requeue); submission 2 is
    killed at its first step (a node failure: a resubmission); the tracker is unreachable from submission 2
    until the mirror has noticed. Every training process's environment is kept, to check that no tracker
    credential reached it."""

    def __init__(self, proxy: Proxy):
        super().__init__()
        self.proxy, self.environs = proxy, []

    def submit(self, preset, overrides, run, number, exclude=()):
        if number == 2:
            self.proxy.down()
        if number == 3:
            record = Path(run.tracker("mlflow"))
            deadline = time.time() + 60
            while time.time() < deadline and not (
                record.exists() and json.loads(record.read_text()).get("outages")
            ):
                time.sleep(0.1)
            self.proxy.up()
        submission = super().submit(preset, overrides, run, number, exclude)
        self.environs.append(Path(f"/proc/{submission.proc.pid}/environ").read_bytes())
        if number == 2:
            start = _lines(run.metrics)
            deadline = time.time() + 120
            while _lines(run.metrics) <= start and time.time() < deadline:
                time.sleep(0.01)
            os.killpg(submission.proc.pid, signal.SIGKILL)
        return submission


@pytest.fixture(scope="module")
def tracked_run(prefect_server, mlflow_server, demo_data, tmp_path_factory):
    """A flow run with tracker=mlflow through a requeue, a resubmission and a tracker outage, then a second flow
    run on the finished run directory (a restarted flow): (flow results, run directory, proxy url, executor)."""
    d = tmp_path_factory.mktemp("tracked")
    proxy = Proxy(int(mlflow_server.rsplit(":", 1)[1]))
    executor = RequeueThenKill(proxy)
    overrides = [
        *FLOW_FAST,
        "max_steps=8",
        "stop_after_steps=4",
        "sample_every=3",
        "sample_count=1",
        "sample_tokens=4",
    ]

    @flow(name="pretrain-gpt2-tracked")
    async def tracked(params: PretrainParams):
        return await run_pretrain(params, executor)

    os.environ["MLFLOW_TRACKING_TOKEN"] = (
        SECRET  # the server ignores it; the jobs must never see it
    )
    try:
        p = _params(
            d,
            overrides=overrides,
            data=demo_data,
            tracker="mlflow",
            tracker_uri=f"http://127.0.0.1:{proxy.port}",
            tracker_finish_timeout_s=20,
        )
        first = asyncio.run(tracked(p))
        assert (
            os.environ["MLFLOW_TRACKING_TOKEN"] == SECRET
        )  # out of the jobs' environment, back afterwards
        again = asyncio.run(pretrain(p))
    finally:
        os.environ.pop("MLFLOW_TRACKING_TOKEN", None)
    return first, again, d / "store" / "runs" / "t", executor


def test_one_mlflow_run_holds_every_step_once_through_requeue_resubmission_outage_and_flow_restart(
    tracked_run, mlflow_server
):
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    first, again, run, executor = tracked_run
    states = [s["state"] for s in read_jsonl(run / "submissions.jsonl")]
    assert states == ["requeue", "failed", "completed"], states
    assert first["final_step"] == 8 and again["submissions"] == len(
        states
    )  # the restarted flow submitted nothing
    record = json.loads((run / "trackers" / "mlflow.json").read_text())
    assert (
        record["outages"] >= 1 and record["generation"] == 1 and record["finished"] == "completed"
    )
    assert first["tracker"]["run_id"] == again["tracker"]["run_id"] == record["run_id"]
    assert record["link"].endswith(
        f"/runs/{record['run_id']}"
    )  # also in the flow's summary artifact

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("gpt2-repro")
    runs = client.search_runs(
        [exp.experiment_id], f"tags.`repro.run_dir` = '{run}'", run_view_type=ViewType.ALL
    )
    assert [r.info.run_id for r in runs] == [
        record["run_id"]
    ]  # exactly one tracker run, none deleted
    assert runs[0].info.status == "FINISHED" and runs[0].data.params["train.max_steps"] == "8"

    metrics = read_jsonl(run / "metrics.jsonl")
    history = client.get_metric_history(record["run_id"], "loss")
    assert sorted(m.step for m in history) == list(range(8))  # every step once
    assert {m.step: m.value for m in history} == {m["step"]: m["loss"] for m in metrics}
    vals = client.get_metric_history(record["run_id"], "val_loss")
    assert sorted(m.step for m in vals) == [m["step"] for m in metrics if "val_loss" in m]
    evals = client.get_metric_history(record["run_id"], "eval/hellaswag_acc_norm")
    evaluated = sorted(
        r["step"] for r in first["evaluations"]
    )  # old checkpoints are gone, their results stay
    assert len(evaluated) >= 3 and sorted(m.step for m in evals) == evaluated

    def names(path):
        return sorted(a.path for a in client.list_artifacts(record["run_id"], path))

    sampled = sorted({r["step"] for r in read_jsonl(run / "samples.jsonl")})
    assert len(sampled) >= 3 and names("samples") == [f"samples/step_{s:06d}.txt" for s in sampled]
    events = read_jsonl(
        client.download_artifacts(record["run_id"], "events.jsonl", str(run.parent))
    )
    assert [e["event"] for e in events if e["source"] == "submissions"] == states

    # the tracker's credentials never reached a training process nor any file of the run
    assert all(b"MLFLOW_TRACKING_TOKEN" not in env for env in executor.environs)
    assert len(executor.environs) == len(states)
    for f in run.rglob("*"):
        if f.is_file() and f.stat().st_size < 5_000_000:
            assert SECRET.encode() not in f.read_bytes(), f


def _wandb_records(path):
    """The records of a W&B run file (a LevelDB-style log of protobuf records after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf = Path(path).read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def _wandb_history(wandb_dir, run_id):
    rows = []
    for f in sorted(glob.glob(f"{wandb_dir}/wandb/offline-run-*-{run_id}/run-{run_id}.wandb")):
        for r in _wandb_records(f):
            if r.WhichOneof("record_type") == "history":
                rows.append(
                    {
                        (i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                        for i in r.history.item
                    }
                )
    return rows


def _mirror(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "tracking.mirror", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_wandb_offline_run_mirrored_twice_holds_every_step_once(tracked_run, tmp_path):
    first, _, run, _ = tracked_run
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    for _ in range(2):  # the second pass finds everything delivered and resumes the same run
        done = _mirror("--run-dir", str(run), "--tracker", "wandb", env=env)
        assert done.returncode == 0, done.stderr
    record = json.loads((run / "trackers" / "wandb.json").read_text())
    rows = _wandb_history(tmp_path, record["run_id"])
    assert len(glob.glob(f"{tmp_path}/wandb/offline-run-*")) == 2  # one run id, resumed
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(8))
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [r["loss"] for r in rows if "loss" in r] == [m["loss"] for m in metrics]
    evaluated = sorted(r["step"] for r in first["evaluations"])
    assert sorted(r["eval/step"] for r in rows if "eval/hellaswag_acc_norm" in r) == evaluated
    assert any("events/_type" in r for r in rows) and any("samples/_type" in r for r in rows)


def test_tensorboard_mirror_of_a_requeued_resubmitted_flow_run(tracked_run):
    """The same real run as above into TensorBoard: every step's values, each checkpoint's evaluation, the
    requeue and the resubmission among the events."""
    first, _, run, _ = tracked_run
    _mirror_cli(run)
    tb = _tensorboard(run / "tensorboard")
    metrics = read_jsonl(run / "metrics.jsonl")
    assert tb["scalars"]["loss"] == [(m["step"], pytest.approx(m["loss"])) for m in metrics]
    assert [s for s, _ in tb["scalars"]["eval/hellaswag_acc_norm"]] == sorted(
        r["step"] for r in first["evaluations"]
    )
    [(_, events)] = tb["texts"]["events/text_summary"][-1:]
    assert "| submissions | requeue | 4 |" in events and "| submissions | failed | 4 |" in events
    assert tb["texts"]["status/text_summary"][-1][1] == "run completed"


def _write_run(run: Path, losses: dict[int, float], rollbacks=()):
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(
        json.dumps({"train": {"max_steps": 100}, "model": {"n_layer": 2}})
    )
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": v}) + "\n" for s, v in losses.items())
    )
    if rollbacks:
        (run / "rollbacks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rollbacks))


def test_a_rollback_starts_the_next_generation_holding_each_step_once_with_its_latest_value(
    mlflow_server, tmp_path
):
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    from tracking.mirror import Mirror, make_tracker

    run = tmp_path / "runs" / "rb"
    _write_run(run, {s: 10.0 - s for s in range(6)})
    write_jsonl(
        run / "evaluations.jsonl",
        [{"step": s, "time": 1.0, "hellaswag": {"acc": 0.25, "acc_norm": 0.5}} for s in (2, 5)],
    )
    mirror = Mirror(str(run), make_tracker("mlflow", mlflow_server, "rollbacks"))
    mirror.sync()
    first = mirror.record["run_id"]
    # steps 4 and 5 diverged: the flow set their checkpoint aside and the steps are redone on other data
    _write_run(
        run,
        {**{s: 10.0 - s for s in range(4)}, 4: 1.5, 5: 1.25, 6: 1.0},
        rollbacks=[{"rollback": 1, "resume_step": 3, "skip": "4:6", "time": 2.0}],
    )
    mirror.sync()
    assert mirror.record["generation"] == 2 and mirror.record["superseded"] == [first]
    # a mirror started afresh (a restarted flow) keeps to the new generation
    again = Mirror(str(run), make_tracker("mlflow", mlflow_server, "rollbacks"))
    again.sync()
    live = again.record["run_id"]
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("rollbacks").experiment_id
    active = client.search_runs([exp], f"tags.`repro.run_dir` = '{run}'")
    assert [r.info.run_id for r in active] == [live] != [first]
    history = {m.step: m.value for m in client.get_metric_history(live, "loss")}
    assert (
        len(client.get_metric_history(live, "loss")) == 7
        and history[4] == 1.5
        and history[0] == 10.0
    )
    # the evaluation of a checkpoint the rollback set aside is not part of the run any more
    assert [m.step for m in client.get_metric_history(live, "eval/hellaswag_acc_norm")] == [2]
    old = client.search_runs(
        [exp], f"tags.`repro.run_dir` = '{run}'", run_view_type=ViewType.DELETED_ONLY
    )
    assert [(r.info.run_id, r.data.tags["repro.superseded_by"]) for r in old] == [(first, live)]


def test_a_lost_answer_is_not_delivered_twice(mlflow_server, tmp_path):
    """The tracker stored a batch whose answer never came back: a fresh mirror asks MLflow what it holds."""
    from mlflow import MlflowClient

    from tracking.mirror import Mirror, make_tracker

    run = tmp_path / "runs" / "lost"
    _write_run(run, {s: float(s) for s in range(3)})
    mirror = Mirror(str(run), make_tracker("mlflow", mlflow_server, "lost"))
    mirror.sync()
    record = json.loads((run / "trackers" / "mlflow.json").read_text())
    record["delivered"]["step"] = 0  # as if steps 1 and 2 went through but the mirror never heard
    (run / "trackers" / "mlflow.json").write_text(json.dumps(record))
    _write_run(run, {s: float(s) for s in range(5)})
    Mirror(str(run), make_tracker("mlflow", mlflow_server, "lost")).sync()
    steps = [
        m.step for m in MlflowClient(mlflow_server).get_metric_history(record["run_id"], "loss")
    ]
    assert sorted(steps) == [0, 1, 2, 3, 4]


def _tensorboard(logdir: Path) -> dict:
    """What TensorBoard shows of a log folder, read by its own loader (the classic one, which keeps every point it
    is given: the fast loader would hide a duplicate step by keeping the last)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    texts = {
        tag: [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]
        for tag in acc.Tags()["tensors"]
    }
    return {"scalars": scalars, "texts": texts}


def _mirror_cli(run: Path, *args: str, env=None) -> str:
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "tracking.mirror",
            "--run-dir",
            str(run),
            "--tracker",
            "tensorboard",
            *args,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def test_tensorboard_shows_each_step_once_through_a_lost_record_and_a_rollback(tmp_path):
    """Event files only grow: every writer purges from the step after the last one delivered, so what a mirror
    wrote before it died unrecorded, and what a rollback redid, is shown once, with its latest value."""
    run = tmp_path / "runs" / "tb"
    _write_run(run, {s: 10.0 - s for s in range(6)})
    write_jsonl(
        run / "evaluations.jsonl",
        [{"step": s, "time": 1.0, "hellaswag": {"acc": 0.25, "acc_norm": 0.5}} for s in (2, 5)],
    )
    write_jsonl(run / "samples.jsonl", [{"step": 5, "samples": ["Hello, I'm a language model"]}])
    assert "steps up to 5 delivered" in _mirror_cli(run)
    tb = _tensorboard(run / "tensorboard")
    assert tb["scalars"]["loss"] == [(s, 10.0 - s) for s in range(6)]
    assert tb["scalars"]["eval/hellaswag_acc_norm"] == [(2, 0.5), (5, 0.5)]
    assert tb["texts"]["samples/text_summary"] == [(5, "**0.** Hello, I'm a language model")]
    assert '"n_layer": 2' in tb["texts"]["config/text_summary"][0][1]

    # the mirror wrote steps 3-5 but died before its record said so: sent again, shown once
    record = json.loads((run / "trackers" / "tensorboard.json").read_text())
    record["delivered"]["step"] = 2
    (run / "trackers" / "tensorboard.json").write_text(json.dumps(record))
    _write_run(run, {s: 10.0 - s for s in range(8)})
    _mirror_cli(run)
    assert _tensorboard(run / "tensorboard")["scalars"]["loss"] == [(s, 10.0 - s) for s in range(8)]

    # steps 4-7 diverged and were redone on other data: the next generation replaces the history
    _write_run(
        run,
        {**{s: 10.0 - s for s in range(4)}, 4: 1.5, 5: 1.25, 6: 1.0},
        rollbacks=[{"rollback": 1, "resume_step": 3, "skip": "4:6", "time": 2.0}],
    )
    _mirror_cli(run)
    tb = _tensorboard(run / "tensorboard")
    assert tb["scalars"]["loss"] == [
        (0, 10.0),
        (1, 9.0),
        (2, 8.0),
        (3, 7.0),
        (4, 1.5),
        (5, 1.25),
        (6, 1.0),
    ]
    assert tb["scalars"]["eval/hellaswag_acc_norm"] == [
        (2, 0.5)
    ]  # step 5's checkpoint was set aside
    record = json.loads((run / "trackers" / "tensorboard.json").read_text())
    assert record["generation"] == 2 and record["delivered"]["step"] == 6
    assert record["link"] == f"tensorboard --logdir {run / 'tensorboard'}"


def test_tensorboard_log_folder_on_s3_is_uploaded_after_every_delivery(s3_server, tmp_path):
    import s3fs

    bucket = s3_server["make_bucket"]("tensorboard")
    run = tmp_path / "runs" / "tb-s3"
    _write_run(run, {s: 10.0 - s for s in range(4)})
    env = {**os.environ, **s3_server["env"]}
    staged = set(glob.glob(os.path.join(tempfile.gettempdir(), "tensorboard-*")))
    _mirror_cli(run, "--uri", f"{bucket}/tb/run", env=env)
    _write_run(run, {s: 10.0 - s for s in range(7)})
    _mirror_cli(run, "--uri", f"{bucket}/tb/run", env=env)  # another process: a second event file
    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=s3_server["endpoint_url"])
    names = fs.ls(f"{bucket}/tb/run")
    assert len(names) == 2
    fs.get(f"{bucket}/tb/run/", str(tmp_path / "down") + "/", recursive=True)
    assert _tensorboard(tmp_path / "down")["scalars"]["loss"] == [(s, 10.0 - s) for s in range(7)]
    assert not (run / "tensorboard").exists()
    assert (
        set(glob.glob(os.path.join(tempfile.gettempdir(), "tensorboard-*"))) == staged
    )  # local copies removed


def test_an_upload_cut_off_mid_delivery_leaves_no_step_twice_on_s3(
    s3_server, tmp_path, monkeypatch
):
    """The store goes away while the mirror uploads: the points it had written are purged by the next writer and
    sent again once the store answers, never written twice into one file by the loop's save after the failure."""
    import fsspec.config
    import s3fs

    from tracking.mirror import Mirror, make_tracker

    bucket = s3_server["make_bucket"]("tensorboard-outage")
    relay = Proxy(int(s3_server["endpoint_url"].rsplit(":", 1)[1]))
    for k, v in s3_server["env"].items():
        monkeypatch.setenv(k, v)
    monkeypatch.setitem(
        fsspec.config.conf,
        "s3",
        {
            "endpoint_url": f"http://127.0.0.1:{relay.port}",
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2},
        },
    )
    s3fs.S3FileSystem.clear_instance_cache()
    run = tmp_path / "runs" / "outage"
    _write_run(run, {s: 10.0 - s for s in range(4)})
    mirror = Mirror(str(run), make_tracker("tensorboard", f"{bucket}/tb", "x"))
    mirror.sync()
    _write_run(run, {s: 10.0 - s for s in range(7)})
    relay.down()
    try:
        with pytest.raises(Exception):  # noqa: B017 (the relay is down: any transport error)
            mirror.sync()
    finally:
        relay.up()
    assert json.loads((run / "trackers" / "tensorboard.json").read_text())["delivered"]["step"] == 3
    # what the mirror's loop does after a failure (Mirror.follow): it saves the record with the outage counted,
    # here once the store answers again, then asks the tracker what it holds before the next delivery
    try:
        mirror._save()
    except Exception:
        pass
    assert json.loads((run / "trackers" / "tensorboard.json").read_text())["delivered"]["step"] == 3
    mirror.reconcile = True
    mirror.sync()
    mirror.tracker.close()
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=s3_server["endpoint_url"])
    fs.get(f"{bucket}/tb/", str(tmp_path / "down") + "/", recursive=True)
    assert _tensorboard(tmp_path / "down")["scalars"]["loss"] == [(s, 10.0 - s) for s in range(7)]
    assert mirror.delivered["step"] == 6


def test_tracker_mistakes_are_one_line_before_anything_runs(prefect_server, tmp_path, monkeypatch):
    done = _mirror(
        "--run-dir", str(tmp_path / "nothing"), "--tracker", "mlflow", "--uri", "http://127.0.0.1:1"
    )
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: no run at {tmp_path / 'nothing'}: neither config.json nor metrics.jsonl is there"
    ]
    _write_run(tmp_path / "r", {0: 1.0})
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    done = _mirror("--run-dir", str(tmp_path / "r"), "--tracker", "mlflow")
    assert (
        done.returncode == 2
        and "needs its address" in done.stderr
        and len(done.stderr.splitlines()) == 1
    )
    with pytest.raises(
        FlowFailure, match="tracker=mlflow needs tracker_uri or MLFLOW_TRACKING_URI"
    ):
        asyncio.run(pretrain(_params(tmp_path / "f", overrides=FLOW_FAST, tracker="mlflow")))
    assert not (tmp_path / "f" / "store" / "runs" / "t" / "submissions.jsonl").exists()


def test_an_unreachable_tracker_fails_the_one_shot_mirror_with_one_line_and_loses_nothing(tmp_path):
    _write_run(tmp_path / "r", {0: 1.0, 1: 0.5})
    done = _mirror(
        "--run-dir",
        str(tmp_path / "r"),
        "--tracker",
        "mlflow",
        "--uri",
        f"http://127.0.0.1:{free_port()}",
    )
    assert done.returncode == 1 and done.stderr.strip().startswith(
        "error: mlflow does not answer"
    ), done.stderr
    assert "Traceback" not in done.stderr


def test_credentials_leave_the_environment_and_never_reach_a_log_line():
    env = {"MLFLOW_TRACKING_TOKEN": SECRET, "WANDB_API_KEY": "k" * 40, "PATH": "/bin"}
    taken = take_credentials(env)
    assert env == {"PATH": "/bin"} and set(taken) == {"MLFLOW_TRACKING_TOKEN", "WANDB_API_KEY"}
    line = f"401 from https://alice:pw@mlflow.lab/api with Bearer {SECRET} and key {'k' * 40}"
    assert redact(line, taken) == "401 from https://***@mlflow.lab/api with Bearer *** and key ***"


# ----------------------------------------------------------------------------- a sweep: one parent run


def test_a_sweep_is_one_tracker_run_with_its_trials_as_children(
    prefect_server, mlflow_server, demo_data, tmp_path
):
    """MLflow through the sweep flow (the sweep's mirror and each trial's, as a user runs them); then the same
    sweep's folders into W&B (offline) and TensorBoard through the mirrors' command lines."""
    from helpers import fast_run
    from mlflow import MlflowClient

    from flows.sweep import SweepParams, sweep

    store_dir = tmp_path / "store"
    p = SweepParams.model_validate(
        {
            "name": "lr",
            "space": {
                "preset": "tiny",
                "overrides": fast_run(10, val_every=5, checkpoint_every=5),
                "dimensions": [{"key": "optim.max_lr", "choices": [1e-2, 1e-3]}],
                "sampler": "grid",
                "trials": 2,
                "max_concurrent": 2,
            },
            "run": {
                "store": str(store_dir),
                "data": demo_data,
                "evaluation": {"tasks": []},
                "poll_seconds": 0.5,
                "tracker": {"kind": "mlflow", "uri": mlflow_server, "interval_s": 0.5},
            },
            "pruner": "none",
        }
    )
    result = asyncio.run(sweep(p))
    assert result["completed"] == 2

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("gpt2-repro")
    sweep_dir = store_dir / "sweeps" / "lr"
    parents = client.search_runs(
        [exp.experiment_id],
        f"tags.`repro.sweep_dir` = '{sweep_dir}' and tags.`repro.role` = 'sweep'",
    )
    assert len(parents) == 1  # one parent, made by the sweep's mirror alone
    parent = parents[0]
    assert parent.info.run_name == "lr" and parent.info.status == "FINISHED"
    assert parent.data.params["space.sampler"] == "grid" and parent.data.params["pruner"] == "none"
    children = client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert sorted(r.info.run_name for r in children) == ["lr-t000", "lr-t001"]
    for child in children:  # each trial's own run: every step, and the swept value among its params
        metrics = read_jsonl(store_dir / "runs" / child.info.run_name / "metrics.jsonl")
        history = client.get_metric_history(child.info.run_id, "loss")
        assert sorted(m.step for m in history) == [m["step"] for m in metrics]
        assert child.info.status == "FINISHED" and "optim.max_lr" in child.data.params

    win = result["winner"]
    assert parent.data.tags["winner.run"] == win["run"]
    assert float(parent.data.tags["winner.final_val_loss"]) == pytest.approx(win["final_val_loss"])
    finals = client.get_metric_history(parent.info.run_id, "trial_final_val_loss")
    assert sorted((m.step, round(m.value, 5)) for m in finals) == sorted(
        (t["trial"], round(t["final_val_loss"], 5))
        for t in json.loads(
            Path(
                client.download_artifacts(parent.info.run_id, "trials.json", str(tmp_path))
            ).read_text()
        )
    )
    assert "curves.png" in [a.path for a in client.list_artifacts(parent.info.run_id)]

    # W&B, offline: the trials one group, the sweep's run in it
    wandb_dir = tmp_path / "wandb"
    wandb_dir.mkdir()
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tracking.sweep_mirror",
            "--sweep-dir",
            str(sweep_dir),
            "--tracker",
            "wandb",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    trial = store_dir / "runs" / "lr-t000"
    done = _mirror(
        "--run-dir", str(trial), "--tracker", "wandb", "--sweep", str(sweep_dir), env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = {}
    for f in glob.glob(f"{wandb_dir}/wandb/offline-run-*/run-*.wandb"):
        for r in _wandb_records(f):
            if r.WhichOneof("record_type") == "run":
                runs[r.run.display_name] = (r.run.run_group, r.run.job_type)
    assert runs == {"lr": ("lr", "sweep"), "lr-t000": ("lr", "trial")}

    # TensorBoard: a trial's folder under the sweep's log folder, its HParams session beside it
    tb = tmp_path / "tb"
    for t in ("lr-t000", "lr-t001"):
        _mirror_cli(store_dir / "runs" / t, "--uri", str(tb / t), "--sweep", str(sweep_dir))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tracking.sweep_mirror",
            "--sweep-dir",
            str(sweep_dir),
            "--tracker",
            "tensorboard",
            "--uri",
            str(tb),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    for t in ("lr-t000", "lr-t001"):
        shown = _tensorboard(tb / t)["scalars"]
        metrics = read_jsonl(store_dir / "runs" / t / "metrics.jsonl")
        assert [s for s, _ in shown["loss"]] == [m["step"] for m in metrics]
        acc = EventAccumulator(str(tb / t / "hparams"))
        acc.Reload()
        start = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        info = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info
        assert info.hparams["optim.max_lr"].number_value in (1e-2, 1e-3)
        final = [e.value for e in acc.Scalars("final_val_loss")]
        assert final == pytest.approx([metrics[-1]["val_loss"]], rel=1e-5)
    assert "lr-t001" in _tensorboard(tb / "sweep")["texts"]["trials/text_summary"][0][1]
