"""The sweep flow on a real (temporary) Prefect server, its trials real pretrain runs on the local executor, its
study a real Optuna SQLite study in the store."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from helpers import REPO, fast_run, read_jsonl, sacct_jobs

from flows.sweep import SweepParams, sweep

# the tiny preset at ~30 ms steps: a validation every 5 steps is a rung
RUN = [*fast_run(30, val_every=5, checkpoint_every=5), "max_skips=2"]


def _params(tmp_path, demo_data, space: dict, **kw) -> SweepParams:
    run = {
        "store": str(tmp_path / "store"),
        "data": demo_data,
        "evaluation": {"tasks": []},
        "resubmission": {"max_rollbacks": 0, "backoff_seconds": 0},
        "poll_seconds": 0.5,
    }
    space = {"preset": "tiny", "overrides": RUN, **space}
    return SweepParams.model_validate({"name": "s", "space": space, "run": run, **kw})


def _study(tmp_path, name="s"):
    db = tmp_path / "store" / "sweeps" / name / "study.db"
    return optuna.load_study(study_name=name, storage=f"sqlite:///{db}")


def _most_at_once(trials) -> int:
    """The most trials that ran at the same moment, from the study's own start and end times."""
    edges = []
    for t in trials:
        edges += [(t.datetime_start.timestamp(), 1), (t.datetime_complete.timestamp(), -1)]
    now = most = 0
    for _, d in sorted(edges, key=lambda e: (e[0], e[1])):
        now += d
        most = max(most, now)
    return most


def test_a_sweep_prunes_the_trial_that_is_behind_records_the_failed_one_and_names_the_winner(
    prefect_server, demo_data, tmp_path
):
    space = {
        "dimensions": [
            # a learning rate that learns and one that hardly does. The good one also fails once for the
            # cluster's reasons: its processes die at step 27, as on a node that fails, and its own flow
            # resubmits it. A set gives the death to those trials alone: a pruned trial's hold lands a few polls
            # after its rung, and a death on its way there would race the hold
            {
                "key": "lr",
                "sets": {
                    "good": {"optim.max_lr": 1e-2, "debug.die_at_step": 27},
                    "slow": {"optim.max_lr": 1e-6},
                },
            },
            # a trial that fails for its own reasons: it diverges (NaN losses) and has no rollback left
            {"key": "debug.fault_steps", "choices": ["[]", "[1,2,3]"]},
        ],
        "sampler": "grid",
        "trials": 4,
        "max_concurrent": 2,
    }
    p = _params(tmp_path, demo_data, space, pruner="halving", min_steps=5)
    result = asyncio.run(sweep(p))

    study = _study(tmp_path)
    trials = sorted(study.get_trials(), key=lambda t: t.number)
    by = {(t.params["lr"], t.params["debug.fault_steps"]): t for t in trials}
    assert len(trials) == 4 and len(by) == 4  # every grid point once
    good, slow = by[("good", "[]")], by[("slow", "[]")]
    config = json.loads(
        (tmp_path / "store" / "runs" / f"s-t{good.number:03d}" / "config.json").read_text()
    )
    assert (
        config["optim"]["max_lr"] == 1e-2 and config["debug"]["die_at_step"] == 27
    )  # the set, whole
    assert good.state.name == "COMPLETE" and good.value == pytest.approx(
        read_jsonl(tmp_path / "store" / "runs" / f"s-t{good.number:03d}" / "metrics.jsonl")[-1][
            "val_loss"
        ]
    )
    assert by[("good", "[1,2,3]")].state.name == by[("slow", "[1,2,3]")].state.name == "FAIL"
    assert "diverged" in by[("good", "[1,2,3]")].user_attrs["result"]["message"]
    # the slow trial was pruned at a rung, and stopped there with a checkpoint to resume from
    assert slow.state.name == "PRUNED"
    slow_run = tmp_path / "store" / "runs" / f"s-t{slow.number:03d}"
    held = json.loads((slow_run / "hold.json").read_text())
    assert held["by"] == "sweep s" and held["reason"].startswith("pruned at step")
    subs = read_jsonl(slow_run / "submissions.jsonl")
    assert [s["next"] for s in subs] == ["held"]
    assert subs[0]["end_step"] < 30 and (slow_run / "checkpoints").is_dir()
    assert _most_at_once(trials) == 2  # the limit, reached and never exceeded

    assert result["winner"]["trial"] == good.number and result["winner"]["params"] == {
        "lr": "good",
        "debug.fault_steps": "[]",
    }
    assert (result["completed"], result["pruned"], result["failed"]) == (1, 1, 2)
    good_run = f"s-t{good.number:03d}"
    assert result["resubmitted"] == {
        good_run: ["failed (killed by signal 9) after its checkpoint at step 25: resubmit"]
    }  # resumed from its checkpoint at step 25, then completed
    assert good.user_attrs["result"]["submissions"] == 2
    assert (tmp_path / "store" / "sweeps" / "s" / "curves.png").exists()

    from prefect.client.orchestration import get_client

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts()

    table = max(
        (a for a in asyncio.run(artifacts()) if a.key == "sweep-s-trials"), key=lambda a: a.created
    )
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert sorted(r["state"] for r in rows) == ["completed", "failed", "failed", "pruned"]
    summary = max(
        (a for a in asyncio.run(artifacts()) if a.key == "sweep-s-summary"), key=lambda a: a.created
    )
    assert f"winner: trial {good.number} (`s-t{good.number:03d}`)" in summary.data
    assert (
        f"[s-t{slow.number:03d}](" in summary.data and "/runs/flow-run/" in summary.data
    )  # linked

    # promoted: the pruned trial resumes from its checkpoint and runs to its end; nothing else runs
    promoted = asyncio.run(sweep(p.model_copy(update={"promote": [slow.number]})))
    subs = read_jsonl(slow_run / "submissions.jsonl")
    assert [s["next"] for s in subs] == ["held", "done"]
    assert subs[1]["start_step"] == subs[0]["end_step"]  # resumed, not started over
    assert read_jsonl(slow_run / "metrics.jsonl")[-1]["step"] == 29
    assert not (slow_run / "hold.json").exists()
    assert promoted["promoted"] == [slow.number] and promoted["trials"] == 4
    assert len(_study(tmp_path).get_trials()) == 4  # no new trial


def _sweep_cmd(params: SweepParams) -> list[str]:
    return [sys.executable, "-m", "flows.sweep", "--params", params.model_dump_json()]


@pytest.mark.parametrize("executor", ["local", "slurm"])
def test_a_sweep_killed_mid_trial_and_restarted_adopts_that_trial_and_repeats_none(
    demo_data, tmp_path, request, executor
):
    space = {
        "dimensions": [{"key": "optim.max_lr", "choices": [1e-2, 3e-3, 1e-3]}],
        "sampler": "grid",
        "trials": 3,
        "max_concurrent": 1,
        "overrides": [*fast_run(40, val_every=10, checkpoint_every=10)],
    }
    p = _params(tmp_path, demo_data, space, pruner="none")
    t0 = time.time()
    if executor == "slurm":  # the trial's job runs on the cluster and outlives the sweep
        request.getfixturevalue("slurm_cluster")
        job_name = f"gpt2-sweep-restart-{os.getpid()}"
        slurm = {
            "nodes": 1,
            "time_min": 20,
            "folder": str(tmp_path / "slurm"),
            "job_name": job_name,
        }
        p = p.model_copy(
            update={"run": p.run.model_copy(update={"executor": "slurm", "slurm": slurm})}
        )
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PREFECT_API_URL", None)  # each flow run on its own temporary server, as a fresh worker
    second_trial = tmp_path / "store" / "runs" / "s-t001"
    first = subprocess.Popen(
        _sweep_cmd(p),
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while not (second_trial / "checkpoints" / "step_000010").exists():
        assert first.poll() is None and time.time() < deadline, (
            "the second trial never checkpointed"
        )
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the sweep and its trial's flow run die at once
    first.wait()
    states = [t.state.name for t in _study(tmp_path).get_trials()]
    assert states == ["COMPLETE", "RUNNING", "WAITING"]  # the grid's last point not asked yet

    second = subprocess.run(
        _sweep_cmd(p), cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "adopting 1 trial(s) left running by an earlier flow run: s-t001" in second.stderr
    trials = sorted(_study(tmp_path).get_trials(), key=lambda t: t.number)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    assert [t.params["optim.max_lr"] for t in trials] == [1e-2, 3e-3, 1e-3]
    runs = tmp_path / "store" / "runs"
    assert sorted(x.name for x in runs.iterdir()) == ["s-t000", "s-t001", "s-t002"]
    assert len(read_jsonl(runs / "s-t000" / "submissions.jsonl")) == 1  # not run twice
    # the adopted trial went on from where it was: its training (a process or job of its own) finished
    # meanwhile, was reattached to, or resumed from a checkpoint; it never started over
    subs = runs / "s-t001" / "submissions.jsonl"
    assert all(s["start_step"] >= 10 for s in (read_jsonl(subs) if subs.exists() else []))
    steps = [m["step"] for m in read_jsonl(runs / "s-t001" / "metrics.jsonl")]
    assert sorted(set(steps)) == list(range(40))
    if (
        executor == "slurm"
    ):  # one job per trial: the adopted one was watched again, not submitted again
        assert len(sacct_jobs(job_name, t0)) == 3
        assert "reattached to job" in second.stderr


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"dimensions": [{"key": "optim.max_lrr", "low": 1e-3, "high": 1e-2}]}, "max_lrr"),
        ({"dimensions": []}, "space.dimensions"),
        ({"trials": 0}, "space.trials"),
        (
            {"dimensions": [{"key": "model.n_head", "choices": [2, 3]}]},
            "the run config refuses 3",
        ),
    ],
    ids=["unknown-key", "empty-space", "no-budget", "rejected-value"],
)
def test_a_sweep_that_cannot_run_is_one_line_and_exit_2_before_any_trial(
    demo_data, tmp_path, change, needle
):
    base = {"dimensions": [{"key": "optim.max_lr", "low": 1e-3, "high": 1e-2}], "trials": 2}
    p = _params(tmp_path, demo_data, base).model_dump(mode="json")
    p["space"].update(change)
    out = subprocess.run(
        [sys.executable, "-m", "flows.sweep", "--params", json.dumps(p)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and needle in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1  # one line, no traceback
    assert not (tmp_path / "store" / "runs").exists()


def test_a_study_that_belongs_to_another_sweep_is_refused(demo_data, tmp_path):
    from flows.sweep import prepare_sweep

    first = _params(
        tmp_path,
        demo_data,
        {"dimensions": [{"key": "optim.max_lr", "choices": [1e-2]}], "trials": 1},
    )
    prepare_sweep(first)
    other = first.model_copy(deep=True)
    other.space.dimensions[0].choices = [3e-3]
    out = subprocess.run(
        [sys.executable, "-m", "flows.sweep", "--params", other.model_dump_json()],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2, out.stderr
    assert "exists" in out.stderr and "another search space" in out.stderr
    assert not (tmp_path / "store" / "runs").exists()


def test_a_sweep_over_model_sizes_fits_loss_against_compute(prefect_server, demo_data, tmp_path):
    space = {
        "dimensions": [{"key": "model.n_embd", "choices": [8, 16, 32]}],
        "sampler": "grid",
        "trials": 3,
        "max_concurrent": 3,
        "overrides": [*fast_run(12, val_every=6, checkpoint_every=12), "model.n_head=2"],
    }
    result = asyncio.run(sweep(_params(tmp_path, demo_data, space, pruner="none", scaling=True)))
    fit = result["scaling"]
    assert "error" not in fit, fit
    compute = [c for c, _ in fit["points"]]
    assert len(compute) == 3 and compute == sorted(compute)  # more width, more FLOPs, same tokens
    losses = [v for _, v in fit["points"]]
    assert max(
        abs(fit["E"] + fit["A"] * c ** -fit["alpha"] - v) for c, v in zip(compute, losses)
    ) < (fit["rmse"] * 3 + 1e-6)  # the law it reports is the one through its points
    assert (tmp_path / "store" / "sweeps" / "s" / "scaling.png").stat().st_size > 0


def test_sweeps_that_name_one_concurrency_limit_share_it(prefect_server, demo_data, tmp_path):
    """Two sweeps at once, two trials each and two at a time of their own, under a Prefect global concurrency
    limit of 1: one trial at a time in all. A limit the server lacks is refused before any trial."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    from flows.pretrain import FlowFailure

    space = {
        "overrides": fast_run(6, val_every=3, checkpoint_every=3),
        "dimensions": [{"key": "optim.max_lr", "choices": [1e-2, 1e-3]}],
        "sampler": "grid",
        "trials": 2,
        "max_concurrent": 2,
    }

    def params(name, limit):
        p = _params(tmp_path, demo_data, space, pruner="none", concurrency_limit=limit)
        return p.model_copy(update={"name": name})

    with pytest.raises(FlowFailure, match="prefect gcl create nowhere --limit N"):
        asyncio.run(sweep(params("x", "nowhere")))
    assert not (tmp_path / "store" / "runs" / "x-t000").exists()  # no trial started

    async def both():
        async with get_client() as client:
            await client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name="trials", limit=1)
            )
        return await asyncio.gather(sweep(params("a", "trials")), sweep(params("b", "trials")))

    results = asyncio.run(both())
    assert [r["completed"] for r in results] == [2, 2]

    async def trial_runs():
        async with get_client() as client:
            names = [f"{s}-t{i:03d}" for s in "ab" for i in range(2)]
            return await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=names))
            )

    runs = asyncio.run(trial_runs())
    assert len(runs) == 4 and all(r.state.is_completed() for r in runs)
    edges = sorted(
        [(r.start_time.timestamp(), 1) for r in runs]
        + [(r.end_time.timestamp(), -1) for r in runs],
        key=lambda e: (e[0], e[1]),
    )
    now = most = 0
    for _, d in edges:
        now += d
        most = max(most, now)
    assert most == 1  # each sweep would have run two at once alone
