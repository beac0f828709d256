"""The deployments as users run them: a real Prefect server (`prefect server start`), prefect.yaml deployed to a
process work pool with a real worker, training jobs on the real local Slurm cluster, an S3 store on moto's
server, and the UI checked in headless Chromium."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import DEPLOYMENT_FAST as FAST
from helpers import (
    REPO,
    free_port,
    make_examples,
    read_jsonl,
    release_after_requeue,
    sacct_jobs,
    write_jsonl,
)

from common.layout import StoreLayout

PREFECT = str(Path(sys.executable).parent / "prefect")

SECRET = "s3cret-flow-0xBADC0DE"  # the store's secret key: must never show up in logs, artifacts or job files


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """`prefect server start` on a free port with its own PREFECT_HOME; yields the env its clients need."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = dict(
        os.environ,
        PREFECT_HOME=str(home),
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_RUNNER_POLL_FREQUENCY="1",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    log = open(home / "server.log", "wb")
    server = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    import urllib.request

    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail(
                    "prefect server did not start:\n" + (home / "server.log").read_text()[-3000:]
                )
            time.sleep(0.5)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        yield {"env": env, "ui": f"http://127.0.0.1:{port}", "home": home}
    os.killpg(server.pid, signal.SIGTERM)  # SIGTERM, not SIGINT
    server.wait(timeout=60)


def _api(coro_fn):
    from prefect.client.orchestration import get_client

    async def run():
        async with get_client() as client:
            return await coro_fn(client)

    return asyncio.run(run())


def _slurm(folder, name, **kw):
    # time_min=20: below ~10 min submitit counts every signal as a time-out
    return {"nodes": 1, "time_min": 20, "folder": str(folder), "job_name": name, **kw}


def _stop_worker(worker: subprocess.Popen) -> None:
    """SIGTERM the Prefect worker, then SIGKILL it if it has not exited within a minute: a worker that outlives
    its test would take the next test's flow runs from the same pool (Prefect 3.8's worker has been seen to
    ignore SIGTERM after its run ended, under the full suite's load)."""
    os.killpg(worker.pid, signal.SIGTERM)
    try:
        worker.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=60)


def _all_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file())


def test_pretrain_124m_deployment_on_slurm_with_an_s3_store(
    prefect_api, slurm_cluster, s3_server, tmp_path
):
    env, t0 = prefect_api["env"], time.time()
    bucket = s3_server["make_bucket"]("gpt2-flows")
    folder = tmp_path / "slurm"
    hs = write_jsonl(tmp_path / "hs.jsonl", make_examples(4))

    def cli(*args, **kw):
        p = subprocess.run(
            [PREFECT, *args],
            env={**env, **kw.pop("env", {})},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=kw.pop("timeout", 300),
        )
        assert p.returncode == 0, (
            f"prefect {' '.join(args)}: exit {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
        )
        return p.stdout

    cli("work-pool", "create", "gpt2-slurm", "--type", "process")
    cli("--no-prompt", "deploy", "--all", env={"GPT2_STORE": f"{bucket}/store"})
    names = {d.name for d in _api(lambda c: c.read_deployments())}
    assert {
        "pretrain-124m",
        "pretrain-350m",
        "pretrain-774m",
        "pretrain-1558m",
        "prepare-fineweb-edu",
        "evaluate",
    } <= names

    # The worker and the server know nothing of S3: the credentials reach the run only through a Secret block.
    from prefect.blocks.system import Secret

    s3 = {**s3_server["env"], "AWS_SECRET_ACCESS_KEY": SECRET}
    Secret(value=json.dumps(s3)).save("gpt2-store", overwrite=True)
    worker_log = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", "gpt2-slurm"],
        env=env,
        cwd=tmp_path,
        stdout=worker_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        params = {
            "preset": "tiny",
            "store": f"{bucket}/store",
            "run_name": "slurm-s3",
            "executor": "slurm",
            "slurm": _slurm(folder, "gpt2-flow-s3"),
            "overrides": FAST,
            # evaluations as their own Slurm jobs
            "evaluation": {
                "tasks": ["hellaswag"],
                "hellaswag_data": hs,
                "slurm": _slurm(folder, "ignored"),
            },
            "credentials_secret": "gpt2-store",
            "poll_seconds": 1,
        }
        out = cli(
            "deployment",
            "run",
            "pretrain-gpt2/pretrain-124m",
            "--params",
            json.dumps({"params": params}),
            "--watch",
            "--watch-timeout",
            "600",
            timeout=700,
        )
    finally:
        _stop_worker(worker)
    assert "Completed" in out, out[-3000:]
    run_id = next(
        r
        for r in _api(lambda c: c.read_flow_runs())
        if r.name in out and r.parent_task_run_id is None
    ).id
    prefect_api["run"] = {"id": str(run_id), "out": out}

    import s3fs

    fs = s3fs.S3FileSystem(
        key="testing",
        secret=SECRET,
        endpoint_url=s3_server["endpoint_url"],
        skip_instance_cache=True,
    )
    run = "gpt2-flows/store/runs/slurm-s3"
    assert fs.exists(
        "gpt2-flows/store/data/demo/manifest.json"
    )  # prepared by the prepare-data subflow
    for step in (5, 10):
        assert (
            json.loads(fs.cat(f"{run}/checkpoints/step_{step:06d}/eval/hellaswag.json"))["n"] == 4
        )
    assert [
        s["state"]
        for s in json.loads(
            "[" + fs.cat(f"{run}/submissions.jsonl").decode().strip().replace("\n", ",") + "]"
        )
    ] == ["completed"]
    assert fs.exists(f"{run}/curves.png")
    evals = [j for j in sacct_jobs("gpt2-eval", t0) if j[1] == "COMPLETED"]
    assert len(evals) >= 2  # one job per checkpoint, not on the training job's nodes

    flows = {f.id: f.name for f in _api(lambda c: c.read_flows())}
    assert "prepare-data" in {flows[r.flow_id] for r in _api(lambda c: c.read_flow_runs())}
    arts = _api(lambda c: c.read_artifacts())
    kinds = {a.type for a in arts}
    assert {"progress", "table", "markdown"} <= kinds
    curves = [a for a in arts if a.key == "slurm-s3-curves"]
    assert curves and "data:image/png;base64," in curves[0].data
    table = [a for a in arts if a.key == "slurm-s3-checkpoints"]
    assert [row["step"] for row in json.loads(table[0].data)] == [5, 10]

    # The secret is nowhere: not in submitit's pickles and job scripts, the artifacts, the logs, the run dir.
    from prefect.client.schemas.filters import LogFilter

    logs = _api(lambda c: c.read_logs(LogFilter()))
    assert any(
        "[train]" in lg.message for lg in logs
    )  # the training's own console reached the flow's log
    assert SECRET.encode() not in _all_bytes(folder)
    assert (
        SECRET
        not in " ".join(str(a.data) for a in arts) + " ".join(lg.message for lg in logs) + out
    )
    assert not any(
        SECRET.encode() in fs.cat(f)
        for f in fs.find(run)
        if not f.endswith((".npy", ".pt", ".safetensors"))
    )


def test_the_run_page_shows_the_run_and_its_curves_in_a_browser(prefect_api, tmp_path):
    from browser import chromium_path, dump_dom, screenshot

    run = prefect_api.get("run")
    if run is None:
        pytest.skip("needs the deployment run of the test above")
    if chromium_path() is None:
        pytest.skip("no chromium and no way to install it (needs root and apt-get)")
    ui = prefect_api["ui"]
    flow_run = _api(lambda c: c.read_flow_run(run["id"]))
    page = f"{ui}/v2/runs/flow-run/{run['id']}?tab=Artifacts"
    png = screenshot(page, str(tmp_path / "run.png"))
    assert os.path.getsize(png) > 10_000
    dom = dump_dom(page)
    assert flow_run.name in dom and "Completed" in dom
    assert "slurm-s3-curves" in dom  # the artifact cards
    curves = next(a for a in _api(lambda c: c.read_artifacts()) if a.key == "slurm-s3-curves")
    dom = dump_dom(f"{ui}/v2/artifacts/artifact/{curves.id}")
    assert "<img" in dom and 'src="data:image/png;base64,' in dom


def _flow_cmd(params):
    return [sys.executable, "-m", "flows.pretrain", "--params", json.dumps(params)]


def test_a_node_that_dies_under_its_job_is_cordoned_and_the_requeued_job_finishes_elsewhere(
    prefect_api, slurm_cluster, demo_data, tmp_path
):
    """The node of a one-node job goes DOWN mid-run (after the step-5 checkpoint): Slurm ends that attempt
    NODE_FAIL and requeues the job by itself; the flow cordons the node and keeps the job's restart off it, and
    the job finishes on the other node with the loss trace of an uninterrupted run."""
    env = prefect_api["env"]
    store_root, folder = tmp_path / "store", tmp_path / "slurm"
    params = {
        "preset": "tiny",
        "store": str(store_root),
        "run_name": "nodefail",
        "data": demo_data,
        "executor": "slurm",
        "slurm": _slurm(folder, "gpt2-flow-nodefail"),
        "overrides": FAST,
        "eval_tasks": [],
        "poll_seconds": 0.5,
        "backoff_seconds": 0,
    }
    run = store_root / "runs" / "nodefail"
    dead = {}

    def kill_the_node():
        deadline = time.time() + 300
        while time.time() < deadline:
            m = run / "metrics.jsonl"
            if (
                (run / "checkpoints" / "step_000005" / "manifest.json").exists()
                and m.exists()
                and len(m.read_text().splitlines()) >= 7
            ):
                dead["host"] = json.loads((run / "heartbeats" / "rank-00000.json").read_text())[
                    "host"
                ]
                job = json.loads((run / "job.json").read_text())["job_id"]
                subprocess.run(
                    [
                        "scontrol",
                        "update",
                        f"NodeName={dead['host']}",
                        "State=DOWN",
                        "Reason=test: node died",
                    ],
                    check=True,
                )
                while time.time() < deadline:  # the flow keeps the requeued job off the node ...
                    show = subprocess.run(
                        ["scontrol", "show", "job", "-o", job], capture_output=True, text=True
                    )
                    if f"ExcNodeList={dead['host']}" in show.stdout:
                        release_after_requeue(
                            job
                        )  # ... then the job need not sit out Slurm's 120 s hold
                        return
                    time.sleep(0.1)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_node, daemon=True)
    killer.start()
    try:
        p = subprocess.run(
            _flow_cmd(params), env=env, cwd=REPO, capture_output=True, text=True, timeout=600
        )
    finally:
        killer.join(timeout=5)
        if dead:  # the emulated node's slurmd still answers: it comes back by itself, or here
            subprocess.run(
                ["scontrol", "update", f"NodeName={dead['host']}", "State=RESUME"],
                capture_output=True,
            )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    host = dead["host"]
    subs = read_jsonl(run / "submissions.jsonl")
    assert [s["state"] for s in subs] == ["completed"] and subs[0]["cordoned"] == [host], subs
    assert [c["host"] for c in read_jsonl(run / "cordon.jsonl")] == [host]
    attempts = subprocess.run(
        ["sacct", "-j", subs[0]["job_id"], "-D", "-X", "-n", "-P", "-o", "State,NodeList"],
        capture_output=True,
        text=True,
    ).stdout.split()
    assert (
        attempts[0] == f"NODE_FAIL|{host}"
        and attempts[-1].startswith("COMPLETED|")
        and attempts[-1] != f"COMPLETED|{host}"
    ), attempts
    assert (
        f"node {host} failed under job {subs[0]['job_id']} (NODE_FAIL) and Slurm requeued the job; cordoned "
        "for 24 h and excluded from its restart" in p.stdout + p.stderr
    )
    events = next(
        a for a in _api(lambda c: c.read_artifacts()) if a.key == "nodefail-events"
    )  # the UI's table
    rows = [(r["event"], r["data"]) for r in json.loads(events.data)]
    assert ("node lost", host) in rows and ("cordon", host) in rows, rows

    # The same run uninterrupted, in one plain process.
    ref = tmp_path / "ref"
    sets = [a for kv in [f"run_dir={ref}", f"data_url={demo_data}", *FAST] for a in ("--set", kv)]
    subprocess.run(
        [sys.executable, "-m", "training.train", "--config", "tiny", *sets],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    from training.metrics import (
        read_metrics,
    )  # skips a line the kill tore, as every reader of the file does

    def trace(d):
        return {m["step"]: m["loss"] for m in read_metrics(str(d))}  # last write of a step wins

    assert trace(run) == trace(ref)


def test_a_frozen_rank_of_a_two_node_job_is_found_its_node_cordoned_and_the_run_finishes_with_the_same_losses(
    prefect_api, slurm_cluster, demo_data, tmp_path
):
    """Rank 1 of a 2-node job freezes (SIGSTOP: alive to Slurm, silent to its heartbeats; rank 0 waits in the
    all-reduce, beating on). The flow finds the hang, ends the job at once, cordons the frozen rank's node and,
    with allow_shrink, resubmits on the node left; the run completes with the losses of an uninterrupted run."""
    env = prefect_api["env"]
    store_root = tmp_path / "store"
    steps = 40
    fast = [
        *FAST,
        f"max_steps={steps}",
        "val_tokens=128",
        "max_lr=3e-3",
        "train.heartbeat_seconds=0.5",
    ]
    params = {
        "preset": "tiny",
        "store": str(store_root),
        "run_name": "hung",
        "data": demo_data,
        "executor": "slurm",
        "slurm": _slurm(tmp_path / "slurm", "gpt2-flow-hang", nodes=2),
        "overrides": fast,
        "eval_tasks": [],
        "poll_seconds": 0.5,
        "backoff_seconds": 0,
        "hang_floor_s": 5,
        "startup_timeout_s": 120,
        "allow_shrink": True,
    }
    run = store_root / "runs" / "hung"
    frozen = {}

    def freeze_rank_1():
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                beat = json.loads((run / "heartbeats" / "rank-00001.json").read_text())
            except (OSError, ValueError):
                beat = {}
            # past the step-5 checkpoint, and that checkpoint whole (it is written in the background)
            if (beat.get("step") or 0) >= 7 and (
                run / "checkpoints" / "step_000005" / "manifest.json"
            ).exists():
                os.kill(beat["pid"], signal.SIGSTOP)
                frozen.update(beat)
                return
            time.sleep(0.05)

    freezer = threading.Thread(target=freeze_rank_1, daemon=True)
    freezer.start()
    p = subprocess.run(
        _flow_cmd(params), env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    subs = read_jsonl(run / "submissions.jsonl")
    assert [s["state"] for s in subs] == ["hung", "completed"], subs
    host = frozen["host"]
    assert (
        subs[0]["reason"].startswith("hang at step ")
        and f"silent ranks: {host}:1;" in subs[0]["reason"]
    )
    # ended at once: the frozen rank never woke to write a stop checkpoint, so the run resumed from a periodic one
    assert subs[0]["cordoned"] == [host] and subs[1]["start_step"] == subs[0]["end_step"]
    assert subs[0]["end_step"] >= 5 and subs[0]["end_step"] % 5 == 0
    assert [c["host"] for c in read_jsonl(run / "cordon.jsonl")] == [host]
    nodes = subprocess.run(
        ["sacct", "-j", subs[1]["job_id"], "-X", "-n", "-P", "-o", "NodeList"],
        capture_output=True,
        text=True,
    ).stdout.split()
    assert (
        subs[1]["nodes"] == 1 and nodes and host not in nodes[-1]
    )  # the second job ran on the other node
    assert f"cordoned {host} for 24 h (hung)" in p.stdout + p.stderr

    # The same run uninterrupted, in one plain process: the same global batch, the same losses
    ref = tmp_path / "ref"
    sets = [a for kv in [f"run_dir={ref}", f"data_url={demo_data}", *fast] for a in ("--set", kv)]
    subprocess.run(
        [sys.executable, "-m", "training.train", "--config", "tiny", *sets],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    from training.metrics import read_metrics

    def trace(d):
        return {m["step"]: m["loss"] for m in read_metrics(str(d))}  # last write of a step wins

    got, want = trace(run), trace(ref)
    assert sorted(got) == list(range(steps))
    assert all(got[k] == pytest.approx(want[k], abs=1e-5) for k in want), (got, want)


def test_a_node_failing_its_check_is_cordoned_and_the_run_goes_on_on_the_nodes_left(
    prefect_api, slurm_cluster, demo_data, tmp_path
):
    """A 2-node job on the 2-node cluster; the first node to check itself fails (an injected fault: the emulated
    nodes are healthy). The job fails at once naming the host, the flow cordons it, and with allow_shrink the
    next job runs on the one node left (the global batch kept by gradient accumulation)."""
    fault = tmp_path / "fault"
    env = {
        **prefect_api["env"],
        "GPT2_NODE_CHECK_FAIL_ONCE": str(fault),
    }  # sbatch exports it to the job
    store_root = tmp_path / "store"
    params = {
        "preset": "tiny",
        "store": str(store_root),
        "run_name": "badnode",
        "data": demo_data,
        "executor": "slurm",
        "slurm": _slurm(tmp_path / "slurm", "gpt2-flow-badnode", nodes=2),
        "overrides": [*FAST, "val_tokens=128"],
        "eval_tasks": [],
        "poll_seconds": 0.5,
        "backoff_seconds": 0,
        "allow_shrink": True,
    }
    p = subprocess.run(
        _flow_cmd(params), env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    run = store_root / "runs" / "badnode"
    subs = read_jsonl(run / "submissions.jsonl")
    assert [s["state"] for s in subs] == ["failed", "completed"], subs
    assert fault.exists() and subs[0]["end_step"] == 0  # it failed before a step, not mid-run
    host = subs[0]["cordoned"][0]
    assert f"node check failed on host {host}: injected fault" in subs[0]["reason"]
    assert (
        subs[1]["nodes"] == 1
        and "submission 2 runs on 1 of the job's 2 nodes (allow_shrink)" in p.stderr
    )
    nodes = subprocess.run(
        ["sacct", "-j", subs[1]["job_id"], "-X", "-n", "-P", "-o", "NodeList"],
        capture_output=True,
        text=True,
    ).stdout.split()
    assert nodes and host not in nodes[-1] and "," not in nodes[-1] and "[" not in nodes[-1]
    assert json.loads(p.stdout)["final_step"] == 10


def test_a_diverging_slurm_job_is_rolled_back_past_its_data_and_the_run_completes(
    prefect_api, slurm_cluster, demo_data, tmp_path
):
    env = prefect_api["env"]
    store_root = tmp_path / "store"
    params = {
        "preset": "tiny",
        "store": str(store_root),
        "run_name": "diverging",
        "data": demo_data,
        "executor": "slurm",
        "slurm": _slurm(tmp_path / "slurm", "gpt2-flow-diverge"),
        "overrides": [*FAST, "max_skips=3", 'fault_batches=["6:9"]'],
        "eval_tasks": [],
        "poll_seconds": 0.5,
    }
    p = subprocess.run(
        _flow_cmd(params), env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    run = store_root / "runs" / "diverging"
    assert [s["state"] for s in read_jsonl(run / "submissions.jsonl")] == ["diverged", "completed"]
    assert [(r["skip"], r["resume_step"]) for r in read_jsonl(run / "rollbacks.jsonl")] == [
        ("6:9", 5)
    ]
    assert [a["event"] for a in read_jsonl(run / "attempts.jsonl")] == ["diverged", "completed"]
    assert (
        "diverged at steps [6, 8] (data batches 6:9: non-finite loss): rolling back"
        in p.stdout + p.stderr
    )
    assert (
        read_jsonl(run / "metrics.jsonl")[-1]["data_batch"] == 12
    )  # steps 6..9 read batches 9..12


def test_a_restarted_flow_reattaches_to_its_job_and_logs_its_requeues(
    prefect_api, slurm_cluster, demo_data, tmp_path
):
    env, t0 = prefect_api["env"], time.time()
    store_root, folder = tmp_path / "store", tmp_path / "slurm"
    params = {
        "preset": "tiny",
        "store": str(store_root),
        "run_name": "restarted",
        "data": demo_data,
        "executor": "slurm",
        "slurm": _slurm(folder, "gpt2-flow-restart"),
        "overrides": [*FAST, "max_steps=400", "checkpoint_every=100"],
        "eval_tasks": [],
        "poll_seconds": 0.5,
    }
    run = store_root / "runs" / "restarted"
    first = subprocess.Popen(
        _flow_cmd(params),
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 180
    while not (run / "job.json").exists() and time.time() < deadline:
        time.sleep(0.1)
    job = json.loads((run / "job.json").read_text())["job_id"]
    os.killpg(first.pid, signal.SIGKILL)  # the worker dies; the Slurm job goes on
    first.wait()

    log_path = tmp_path / "second.log"
    with open(log_path, "wb") as log:
        second = subprocess.Popen(
            _flow_cmd(params), env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.time() + 120
        while f"reattached to job {job}" not in log_path.read_text() and time.time() < deadline:
            assert second.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.1)
        state = subprocess.run(
            ["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True
        ).stdout
        assert state.strip() == "RUNNING", (
            f"job {job} is {state!r}: it must still be training to be preempted"
        )
        subprocess.run(
            ["scancel", "--signal=USR2", job], check=True
        )  # what Slurm sends before preempting
        release_after_requeue(job)
        assert second.wait(timeout=600) == 0, log_path.read_text()[-5000:]
    out = log_path.read_text()
    assert (
        f"job {job}: requeue (preemption) at step" in out
    )  # the requeue inside the job reached the flow's log
    subs = read_jsonl(run / "submissions.jsonl")
    assert [(s["job_id"], s["state"]) for s in subs] == [(job, "completed")]
    assert [j[0] for j in sacct_jobs("gpt2-flow-restart", t0)] == [job]  # no second job
    assert read_jsonl(run / "metrics.jsonl")[-1]["step"] == 399


def test_cancelling_the_flow_run_cancels_its_slurm_job(
    prefect_api, slurm_cluster, demo_data, tmp_path
):
    env = prefect_api["env"]
    subprocess.run(
        [PREFECT, "work-pool", "create", "gpt2-slurm", "--type", "process", "--overwrite"],
        env=env,
        capture_output=True,
        check=True,
    )
    subprocess.run(
        [PREFECT, "--no-prompt", "deploy", "--name", "pretrain-124m"],
        env={**env, "GPT2_STORE": "store"},
        cwd=REPO,
        capture_output=True,
        check=True,
    )
    run = tmp_path / "store" / "runs" / "cancelled"
    params = {
        "preset": "tiny",
        "store": str(tmp_path / "store"),
        "run_name": "cancelled",
        "data": demo_data,
        "executor": "slurm",
        "slurm": _slurm(tmp_path / "slurm", "gpt2-flow-cancel"),
        "overrides": [*FAST, "max_steps=100000", "checkpoint_every=1000"],
        "evaluation": {"tasks": []},
        "poll_seconds": 0.5,
    }
    worker = subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", "gpt2-slurm"],
        env=env,
        cwd=tmp_path,
        stdout=open(tmp_path / "worker.log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        subprocess.run(
            [
                PREFECT,
                "deployment",
                "run",
                "pretrain-gpt2/pretrain-124m",
                "--params",
                json.dumps({"params": params}),
            ],
            env=env,
            cwd=REPO,
            capture_output=True,
            check=True,
        )
        run_id = next(
            str(r.id)
            for r in _api(lambda c: c.read_flow_runs())
            if r.parameters.get("params", {}).get("run_name") == "cancelled"
        )
        deadline = time.time() + 180
        while not (run / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.2)
        job = json.loads((run / "job.json").read_text())["job_id"]
        subprocess.run(
            [PREFECT, "flow-run", "cancel", run_id], env=env, capture_output=True, check=True
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            state = subprocess.run(
                ["sacct", "-n", "-X", "-P", "-j", job, "-o", "State"],
                capture_output=True,
                text=True,
            ).stdout.strip()
            if state.startswith("CANCELLED"):
                break
            time.sleep(0.5)
        assert state.startswith("CANCELLED"), (
            f"job {job} is {state!r} after the flow run was cancelled:\n"
            + (tmp_path / "worker.log").read_text()[-3000:]
        )
    finally:
        _stop_worker(worker)
        subprocess.run(["scancel", "--name", "gpt2-flow-cancel"], capture_output=True)


def test_served_deployments_run_without_a_work_pool(prefect_api, demo_data, tmp_path):
    """The laptop path: `python -m flows.serve` serves the same deployments from one process (local executor)."""
    env = prefect_api["env"]
    # Served and pool deployments of one name are alternatives: drop the one prefect.yaml registered above.
    subprocess.run(
        [PREFECT, "deployment", "delete", "pretrain-gpt2/pretrain-124m"],
        env=env,
        capture_output=True,
    )
    log = open(tmp_path / "serve.log", "wb")
    served = subprocess.Popen(
        [sys.executable, "-m", "flows.serve", "--store", str(tmp_path / "store")],
        env=env,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            deps = {d.name: d for d in _api(lambda c: c.read_deployments())}
            if "pretrain-124m" in deps:
                assert (
                    deps["pretrain-124m"].work_pool_name is None
                )  # served by this process, not a pool
                break
            assert served.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
        else:
            pytest.fail(
                "flows.serve did not register pretrain-124m:\n"
                + (tmp_path / "serve.log").read_text()[-3000:]
            )
        # the demos it serves run on a fresh store: the evaluation task they check before training is there
        task = Path(StoreLayout(str(tmp_path / "store")).demo_eval)
        assert (task / "demo_hellaswag.jsonl").stat().st_size and (
            task / "demo_hellaswag.yaml"
        ).exists()
        params = {
            "preset": "tiny",
            "store": str(tmp_path / "store"),
            "run_name": "laptop",
            "data": demo_data,
            "overrides": FAST,
            "evaluation": {"tasks": []},
            "poll_seconds": 0.5,
        }
        p = subprocess.run(
            [
                PREFECT,
                "deployment",
                "run",
                "pretrain-gpt2/pretrain-124m",
                "--params",
                json.dumps({"params": params}),
                "--watch",
                "--watch-timeout",
                "300",
            ],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=400,
        )
    finally:
        os.killpg(served.pid, signal.SIGTERM)
        served.wait(timeout=60)
    assert p.returncode == 0 and "Completed" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
    assert read_jsonl(tmp_path / "store" / "runs" / "laptop" / "metrics.jsonl")[-1]["step"] == 9
