"""The pretrain flow on a real (temporary) Prefect server, with the local executor."""

import asyncio
import json
import os
import re
import signal
import socket
import time

import pytest
from helpers import (
    FAST_RECIPE,
    FLOW_FAST,
    REPO,
    free_port,
    make_examples,
    make_shards,
    read_jsonl,
    tiny_hellaswag_task,
    write_jsonl,
)
from prefect import flow

from flows.executors import LocalTrainingExecutor
from flows.params import EvaluationParams, PretrainParams
from flows.pretrain import FlowFailure, pretrain, run_pretrain

SHARDS: dict[str, str] = {}


@pytest.fixture(autouse=True, scope="module")
def _shared_shards(demo_data):
    SHARDS["demo"] = demo_data


def _params(tmp_path, **kw):
    """The flow on the session's demo shards (preparing them is the first test's part, and others' elsewhere)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    hs = write_jsonl(tmp_path / "hs.jsonl", make_examples(4))
    kw = {"overrides": FLOW_FAST, "data": SHARDS["demo"], "store": str(tmp_path / "store"), **kw}
    return PretrainParams(
        run_name="t",
        hellaswag_data=hs,
        poll_seconds=0.5,
        backoff_seconds=0,
        **kw,
    )


def test_flow_trains_evaluates_every_checkpoint_and_reports(prefect_server, tmp_path):
    result = asyncio.run(pretrain(_params(tmp_path, data=None)))  # the shards are prepared first
    assert result["final_step"] == 6 and result["submissions"] == 1
    assert [r["step"] for r in result["evaluations"]] == [3, 6]
    assert all(r["hellaswag_acc_norm"] is not None for r in result["evaluations"])
    assert all(r["val_loss"] is not None for r in result["evaluations"])
    run = tmp_path / "store" / "runs" / "t"
    assert (run / "checkpoints" / "step_000003" / "eval" / "hellaswag.json").exists()
    assert (run / "curves.png").exists()
    assert read_jsonl(run / "submissions.jsonl")[0]["state"] == "completed"

    from prefect.client.orchestration import get_client

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts()

    arts = asyncio.run(artifacts())
    assert {"progress", "table", "markdown"} <= {a.type for a in arts}
    status = [a for a in arts if a.key == "t-status"]
    assert any(
        "| 6 / 6 |" in a.data for a in status
    )  # a version per 1% of the run, the last at its end
    assert any(
        re.search(r"\| [^|:]+:0, \d+ ms busy \(median rank \d+ ms\) at step 3 \|", a.data)
        for a in status
    )


def _wait_for_checkpoint(run, step):
    """Until the checkpoint of `step` is whole (its manifest is written last). Checkpoints are written in the
    background, so the step's metrics line can come before its checkpoint is on disk: waiting on metrics would
    sometimes stop the job mid-write and leave it nothing to resume from."""
    from common import store

    manifest = store.join(run.checkpoint(step), "manifest.json")
    deadline = time.time() + 120
    while not store.exists(manifest):
        assert time.time() < deadline, f"no checkpoint of step {step} within 120 s"
        time.sleep(0.02)


class KillFirstSubmission(LocalTrainingExecutor):
    """A node failure: SIGKILL the first submission once it has trained past its first checkpoint."""

    def submit(self, preset, overrides, run, number, exclude=()):
        submission = super().submit(preset, overrides, run, number, exclude)
        if not getattr(self, "_killed", False):
            self._killed = True
            _wait_for_checkpoint(run, 3)
            os.killpg(submission.proc.pid, signal.SIGKILL)
        return submission


def _trace(d):
    return [
        (m["step"], m["loss"]) for m in read_jsonl(d / "store" / "runs" / "t" / "metrics.jsonl")
    ]


@pytest.fixture(scope="module")
def uninterrupted(prefect_server, tmp_path_factory):
    """The loss trace of the flow run the fault tests must reproduce: one submission, nothing going wrong."""
    d = tmp_path_factory.mktemp("uninterrupted")
    result = asyncio.run(pretrain(_params(d, eval_tasks=[])))
    assert result["submissions"] == 1
    return _trace(d)


def test_failed_attempt_is_resubmitted_and_the_loss_trace_matches(
    prefect_server, uninterrupted, tmp_path
):

    @flow(name="pretrain-gpt2-node-failure")
    async def with_node_failure(params: PretrainParams):
        return await run_pretrain(params, KillFirstSubmission())

    killed = asyncio.run(with_node_failure(_params(tmp_path / "b", eval_tasks=[])))
    assert killed["submissions"] == 2
    subs = read_jsonl(tmp_path / "b" / "store" / "runs" / "t" / "submissions.jsonl")
    assert (
        subs[0]["state"] == "failed"
        and "signal 9" in subs[0]["reason"]
        and subs[0]["end_step"] == 3
    )
    assert subs[1]["start_step"] == 3 and subs[1]["state"] == "completed"
    assert _trace(tmp_path / "b") == uninterrupted


def test_a_run_configured_to_die_at_a_step_dies_there_once_and_its_resubmission_goes_past_it(
    prefect_server, uninterrupted, tmp_path
):
    """debug.die_at_step: the fault a sweep's demonstration injects, from inside the run (no test executor),
    so that it works on any executor and from a deployment."""
    params = _params(tmp_path, eval_tasks=[], overrides=[*FLOW_FAST, "debug.die_at_step=4"])
    result = asyncio.run(pretrain(params))
    run = tmp_path / "store" / "runs" / "t"
    subs = read_jsonl(run / "submissions.jsonl")
    assert [s["state"] for s in subs] == ["failed", "completed"] and result["submissions"] == 2
    assert "signal 9" in subs[0]["reason"] and subs[0]["end_step"] == 3  # its last checkpoint
    assert subs[1]["start_step"] == 3
    assert json.loads((run / "faults" / "died-at-step-4.json").read_text())["step"] == 4
    assert _trace(tmp_path) == uninterrupted  # the same run, only interrupted


class FreezeFirstSubmission(LocalTrainingExecutor):
    """A hang: SIGSTOP the first submission's process group after its first checkpoint. It still looks alive
    (its process exists, nothing exits); only its heartbeats and its steps stop."""

    def submit(self, preset, overrides, run, number, exclude=()):
        submission = super().submit(preset, overrides, run, number, exclude)
        if not getattr(self, "_frozen", False):
            self._frozen = True
            _wait_for_checkpoint(run, 3)
            os.killpg(submission.proc.pid, signal.SIGSTOP)
            self.frozen_at = time.monotonic()
        return submission


def test_a_frozen_job_is_detected_cancelled_and_resubmitted_and_the_loss_trace_matches(
    prefect_server, uninterrupted, tmp_path
):
    fast = [
        *FLOW_FAST,
        "train.heartbeat_seconds=0.2",
    ]  # heartbeats change no loss: the same trace is expected
    executor = FreezeFirstSubmission()

    @flow(name="pretrain-gpt2-hang")
    async def with_hang(params: PretrainParams):
        return await run_pretrain(params, executor)

    hung = asyncio.run(
        with_hang(
            _params(
                tmp_path / "b", eval_tasks=[], overrides=fast, hang_floor_s=3, startup_timeout_s=20
            )
        )
    )
    assert hung["submissions"] == 2 and hung["final_step"] == 6
    subs = read_jsonl(tmp_path / "b" / "store" / "runs" / "t" / "submissions.jsonl")
    assert subs[0]["state"] == "hung" and subs[0]["next"] == "resubmit", subs[0]
    # the step its last heartbeat reported (beats lag the loop by up to one interval), and who fell silent
    assert re.match(
        rf"hang at step [1-4] \([a-z]+\), silent ranks: {socket.gethostname()}:0; no new step for ",
        subs[0]["reason"],
    ), subs[0]
    assert (
        subs[0]["end_step"] == 3 and subs[1]["start_step"] == 3 and subs[1]["state"] == "completed"
    )
    detected = subs[0]["time"] - time.time() + time.monotonic() - executor.frozen_at
    assert 3 < detected < 30  # the 3 s floor, plus polls: not the job's time limit, not a person
    assert _trace(tmp_path / "b") == uninterrupted


def test_crash_loop_stops_with_a_clear_message(prefect_server, tmp_path):
    data = tmp_path / "data"
    make_shards(data, [5000, 5000])
    shard = data / "edufineweb_train_000001.npy"
    shard.write_bytes(
        shard.read_bytes()[:-2] + b"\x00\x00"
    )  # bit rot: every attempt dies on its checksum
    p = _params(tmp_path, eval_tasks=[], data=str(data))
    with pytest.raises(FlowFailure, match="crash loop at step 0"):
        asyncio.run(pretrain(p))
    assert len(read_jsonl(tmp_path / "store" / "runs" / "t" / "submissions.jsonl")) == 2


def test_bad_parameter_fails_before_anything_runs(prefect_server, tmp_path):
    with pytest.raises(FlowFailure, match="bad parameter.*max_lrr"):
        asyncio.run(pretrain(_params(tmp_path, overrides=["max_lrr=1"])))
    assert not (tmp_path / "store" / "runs").exists()


def test_hellaswag_without_its_file_fails_before_anything_trains(prefect_server, tmp_path):
    # the store's default file, which nobody staged
    p = _params(tmp_path).model_copy(update={"evaluation": EvaluationParams(tasks=["hellaswag"])})
    with pytest.raises(
        FlowFailure, match=r"evaluation.tasks has hellaswag but .*hellaswag_val.jsonl does not"
    ):
        asyncio.run(pretrain(p))
    assert not (tmp_path / "store" / "runs").exists()


def test_an_lm_eval_task_lm_eval_does_not_know_fails_before_anything_trains(
    prefect_server, tmp_path
):
    p = _params(tmp_path).model_copy(
        update={"evaluation": EvaluationParams(tasks=["hellaswag", "arc_easyy"])}
    )
    with pytest.raises(
        FlowFailure, match="evaluation.tasks has arc_easyy, which lm-eval does not know"
    ):
        asyncio.run(pretrain(p))
    assert not (tmp_path / "store" / "runs").exists()


def test_the_flow_keeps_its_run_where_it_said_and_out_of_other_files(prefect_server, tmp_path):
    """The flow owns where its run lives: an override that moves it elsewhere (the flow would watch an empty
    run while training wrote another) is refused, and so is a run directory holding someone else's files."""
    moved = _params(tmp_path, overrides=[*FLOW_FAST, f"run_dir={tmp_path / 'elsewhere'}"])
    with pytest.raises(FlowFailure, match="override 'run_dir': the flow sets train.run_dir itself"):
        asyncio.run(pretrain(moved))
    run = tmp_path / "store" / "runs" / "t"
    run.mkdir(parents=True)
    (run / "draft.md").write_text("someone's")
    with pytest.raises(
        FlowFailure, match=r"holds files that are not a run directory's \(draft.md\)"
    ):
        asyncio.run(pretrain(_params(tmp_path)))
    assert sorted(x.name for x in run.iterdir()) == ["draft.md"]


def test_a_dead_prefect_server_is_one_clear_line(tmp_path):
    import subprocess
    import sys

    port = free_port()  # nothing listens there
    p = subprocess.run(
        [sys.executable, "-m", "flows.pretrain", "--store", str(tmp_path / "store")],
        cwd=REPO,
        env=dict(os.environ, PREFECT_API_URL=f"http://127.0.0.1:{port}/api"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        p.returncode == 2
        and f"the Prefect server at http://127.0.0.1:{port}/api does not answer" in p.stderr
    )
    assert "Traceback" not in p.stderr and not (tmp_path / "store").exists()


def test_rerunning_a_complete_run_submits_nothing(prefect_server, tmp_path):
    p = _params(tmp_path, eval_tasks=[])
    asyncio.run(pretrain(p))
    again = asyncio.run(pretrain(p))
    assert again["final_step"] == 6
    assert len(read_jsonl(tmp_path / "store" / "runs" / "t" / "submissions.jsonl")) == 1


def test_a_second_flow_run_on_the_same_run_directory_stops_naming_the_first(
    prefect_server, tmp_path
):
    from common.lease import Lease

    p = _params(tmp_path, eval_tasks=[])
    first = Lease(
        p.run_dir().lease("flow"), "flow run first-one", identity="first-flow-run-id"
    ).acquire()
    try:
        with pytest.raises(FlowFailure, match="is in use by flow run first-one"):
            asyncio.run(pretrain(p))
    finally:
        first.release()
    assert not (
        tmp_path / "store" / "runs" / "t" / "submissions.jsonl"
    ).exists()  # nothing was submitted
    assert asyncio.run(pretrain(p))["final_step"] == 6  # once the first is gone, the run goes on


def test_divergence_is_rolled_back_past_its_data_and_the_run_completes_as_if_skipped_from_the_start(
    prefect_server, tmp_path
):
    nine = [*FLOW_FAST, "max_steps=9", "max_skips=3"]
    result = asyncio.run(
        pretrain(_params(tmp_path / "a", eval_tasks=[], overrides=[*nine, 'fault_batches=["4:7"]']))
    )
    run = tmp_path / "a" / "store" / "runs" / "t"
    assert result["final_step"] == 9 and result["submissions"] == 2
    subs = read_jsonl(run / "submissions.jsonl")
    assert [s["state"] for s in subs] == ["diverged", "completed"]
    assert subs[0]["diverged"] == {
        "steps": [4, 6],
        "batches": "4:7",
        "reasons": ["non-finite loss"],
    }
    assert subs[0]["next"] == "rollback" and subs[0]["skipped"] == [
        [s, "non-finite loss"] for s in (4, 5, 6)
    ]
    assert subs[1]["next"] == "done" and "skipped" not in subs[1]
    rollback = read_jsonl(run / "rollbacks.jsonl")
    assert [(r["skip"], r["resume_step"], r["set_aside"]) for r in rollback] == [("4:7", 3, [6])]
    assert (
        run / "rolled-back" / "001" / "step_000006" / "manifest.json"
    ).exists()  # set aside, not deleted
    assert [e["event"] for e in read_jsonl(run / "events.jsonl")] == [
        "skip",
        "skip",
        "skip",
        "diverged",
    ]
    # bit-exact apart from the skipped batches: the same as a run told to pass over them from the start
    asyncio.run(
        pretrain(_params(tmp_path / "b", eval_tasks=[], overrides=[*nine, 'skip_batches=["4:7"]']))
    )

    def trace(d):
        return [
            (m["step"], m["loss"], m.get("data_batch"))
            for m in read_jsonl(d / "store" / "runs" / "t" / "metrics.jsonl")
        ]

    assert trace(tmp_path / "a") == trace(tmp_path / "b")
    assert [m.get("data_batch", m["step"]) for m in read_jsonl(run / "metrics.jsonl")] == [
        0,
        1,
        2,
        3,
        7,
        8,
        9,
        10,
        11,
    ]


def test_divergence_that_survives_the_rollbacks_stops_the_run_naming_it(prefect_server, tmp_path):
    p = _params(
        tmp_path,
        eval_tasks=[],
        max_rollbacks=1,
        overrides=[*FLOW_FAST, "max_steps=9", "max_skips=3", "fault_steps=[4,5,6]"],
    )
    with pytest.raises(
        FlowFailure,
        match=r"diverged at steps \[4, 6\] \(data batches 7:10: non-finite loss\) "
        r"after 1 rollbacks",
    ):
        asyncio.run(pretrain(p))
    subs = read_jsonl(tmp_path / "store" / "runs" / "t" / "submissions.jsonl")
    assert [(s["state"], s["next"]) for s in subs] == [
        ("diverged", "rollback"),
        ("diverged", "stop"),
    ]
    assert subs[1]["message"].startswith("diverged at steps [4, 6]")


def test_a_checkpoint_pruned_while_it_is_evaluated_is_not_a_failed_evaluation(
    prefect_server, demo_data, tmp_path
):
    """Training prunes old checkpoints (checkpoint.keep_last) at its own pace; an evaluation that loses its
    checkpoint that way is no failure: it is left out, and said, while the others are kept; its task run in
    Prefect completes (a red task for it would send a person to look at nothing)."""
    import logging
    import shutil

    from helpers import run_train
    from prefect.runtime import flow_run

    from flows.evaluations import EvaluationScheduler

    run = tmp_path / "run"
    run_train(demo_data, run, "checkpoint_every=4")
    hs = write_jsonl(tmp_path / "hs.jsonl", make_examples(4))
    log = logging.getLogger("test-pruned")

    @flow(name="evaluate-while-pruning")
    async def evaluate_while_pruning():
        evals = EvaluationScheduler(
            str(run), EvaluationParams(tasks=["hellaswag"], hellaswag_data=hs), log
        )
        evals.start_new()  # both checkpoints; the evaluating processes take seconds to start
        shutil.rmtree(run / "checkpoints" / "step_000004")  # pruned meanwhile
        await evals.collect(wait=True)
        return evals.results, flow_run.get_id()

    results, run_id = asyncio.run(evaluate_while_pruning())
    assert sorted(results) == [8] and "error" not in results[8]

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def task_states():
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
            )
            return {r.name: r.state.type.value for r in runs}

    assert asyncio.run(task_states()) == {
        "evaluate step 4": "COMPLETED",
        "evaluate step 8": "COMPLETED",
    }


def test_a_store_credential_reaches_no_sink_of_a_local_run(
    prefect_server, s3_server, tmp_path, monkeypatch
):
    """The store's secret key, given as the flow's Secret block, through a local run on S3 that trains, fails
    once (killed), is resubmitted, evaluates and reports: it is in no log line, state message, artifact,
    parameter shown back, or file of the run directory (its console logs, records and checkpoints included)."""
    import json

    import s3fs
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter

    secret = "s3cret-local-run-0xFEEDFACE"  # moto takes any secret key
    Secret(value=json.dumps({**s3_server["env"], "AWS_SECRET_ACCESS_KEY": secret})).save(
        "store-local", overwrite=True
    )
    bucket = s3_server["make_bucket"]("gpt2-local-secret")
    monkeypatch.chdir(tmp_path)  # a run on a remote store keeps its console logs in ./logs/{run}/
    before = dict(os.environ)
    os.environ.update({k: v for k, v in s3_server["env"].items() if k != "AWS_SECRET_ACCESS_KEY"})

    @flow(name="pretrain-gpt2-secret")
    async def with_a_failure(params: PretrainParams):
        return await run_pretrain(params, KillFirstSubmission())

    params = _params(tmp_path, store=f"{bucket}/store", credentials_secret="store-local")
    try:
        result = asyncio.run(with_a_failure(params))
    finally:
        os.environ.clear()
        os.environ.update(before)
    assert result["submissions"] == 2 and result["final_step"] == 6

    async def shown():
        """Everything the server shows of this flow's runs (the server is shared: filter, page through)."""
        from prefect.client.schemas.filters import (
            ArtifactFilter,
            ArtifactFilterFlowRunId,
            FlowFilter,
            FlowFilterName,
            LogFilterFlowRunId,
        )

        async with get_client() as client:
            mine = FlowFilter(name=FlowFilterName(any_=["pretrain-gpt2-secret"]))
            runs = await client.read_flow_runs(flow_filter=mine)
            ids = [r.id for r in runs]
            logs, page = [], None
            while page is None or len(page) == 200:
                page = await client.read_logs(
                    LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)), limit=200, offset=len(logs)
                )
                logs += page
            arts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids))
            )
        assert runs and logs and arts
        texts = [json.dumps(r.parameters, default=str) + str(r.state.message) for r in runs]
        return texts + [lg.message for lg in logs] + [str(a.data) for a in arts]

    texts = asyncio.run(shown())
    assert any("credentials from Secret 'store-local'" in t for t in texts)
    assert not [t for t in texts if secret in t]
    fs = s3fs.S3FileSystem(
        key="testing",
        secret="testing",
        endpoint_url=s3_server["endpoint_url"],
        skip_instance_cache=True,
    )
    files = fs.find(f"{bucket.removeprefix('s3://')}/store/runs/t")
    assert any("/checkpoints/" in f for f in files) and any("submissions" in f for f in files)
    assert not [f for f in files if secret.encode() in fs.cat(f)]
    consoles = [f for f in (tmp_path / "logs").rglob("*") if f.is_file()]
    assert any(f.name == "submission-002.log" for f in consoles)
    assert not [f for f in consoles if secret.encode() in f.read_bytes()]


def test_the_fast_recipe_through_the_flow_resumes_bit_exactly_and_is_evaluated_by_both_scorers(
    prefect_server, demo_data, tmp_path, monkeypatch
):
    """The fast recipe's run stopped after 3 steps and resubmitted by the flow gives a straight run's trace bit
    for bit, and each checkpoint (a model no Hugging Face GPT-2 holds) is evaluated by our scorer and by
    lm-eval running it in-process, with the same accuracy."""
    from helpers import losses

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    asyncio.run(
        pretrain(
            _params(tmp_path / "straight", overrides=[*FLOW_FAST, *FAST_RECIPE], eval_tasks=[])
        )
    )
    straight = tmp_path / "straight" / "store" / "runs" / "t"
    data = write_jsonl(tmp_path / "hs.jsonl", make_examples(8, seed=3))
    p = _params(
        tmp_path / "flow",
        overrides=[*FLOW_FAST, *FAST_RECIPE, "stop_after_steps=3"],
        evaluation={
            "tasks": ["hellaswag", "tiny_hellaswag"],
            "hellaswag_data": data,
            "include_path": tiny_hellaswag_task(tmp_path, data),
        },
    )
    result = asyncio.run(pretrain(p))
    run = tmp_path / "flow" / "store" / "runs" / "t"
    subs = read_jsonl(run / "submissions.jsonl")
    assert [(s["state"], s["end_step"]) for s in subs] == [("requeue", 3), ("completed", 6)]
    assert losses(run) == losses(straight)
    assert [r["step"] for r in result["evaluations"]] == [3, 6]
    for step in (3, 6):
        ev = run / "checkpoints" / f"step_{step:06d}" / "eval"
        ours = json.loads((ev / "hellaswag.json").read_text())
        lm = json.loads((ev / "lm_eval.json").read_text())
        assert lm["hf_export"] is None  # run in-process: not GPT-2-shaped
        assert lm["tasks"]["tiny_hellaswag"]["acc"] == pytest.approx(ours["acc"])
