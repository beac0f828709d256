"""`pretrain-sweep`: many pretrain runs over one search space, chosen and pruned by Optuna, at most N at once,
the study kept in the store so that a restarted sweep goes on where it was.

    python -m flows.sweep --params sweep.json          # a SweepParams JSON object (or the object itself)
    python -m flows.sweep --demo                       # four learning rates of the demo model, on a CPU

Each trial is a full pretrain run (a child flow run of `pretrain-gpt2`, named `{sweep}-tNNN`, in the run
directory of that name): the same resubmission, hang detection, rollback and evaluation as any run. While it
runs, its val losses are reported to the study at their steps; when the pruner says it is behind, the sweep
puts a hold on it (flows/hold.py), so it stops with a checkpoint: a pruned trial is promoted later by running
its run again (`python -m flows.pretrain --run-name {sweep}-tNNN ...`), which resumes it. A trial whose run
fails (diverged past the rollback cap, a config its cluster refuses) is recorded as failed and the sweep goes on;
a failure of the cluster is resubmitted by the trial's own flow, as in any run.

Nothing lost, nothing twice: the study (Optuna's SQLite storage in `{store}/sweeps/{sweep}/`, or the database of
`study_url`) holds every trial and its parameters before the trial starts. A sweep flow run that was cancelled
or died leaves its running trials marked running; the next flow run of the same sweep adopts them (their pretrain
runs reattach to their jobs or resume from their checkpoints) before it asks for new ones.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact
from prefect.runtime import flow_run as current_run
from pydantic import Field, ValidationError, model_validator

from common import exit_codes, store
from common.cli import entry_point, read_json_object
from common.errors import BadInput
from common.layout import RunDir, SweepDir
from common.lease import Lease, LeaseHeld
from common.secrets import has_password
from flows.hold import request_hold
from flows.params import PretrainParams, _Params
from flows.prefect_server import api_problem, quiet_temporary_server
from flows.pretrain import (
    FlowFailure,
    check_evaluation,
    check_tracker,
    ensure_data,
    pretrain,
    resolve_config,
)
from flows.report import artifact_key
from flows.sweep_space import SweepError, SweepSpace, Value
from training.config import load_config
from training.metrics import read_metrics

__all__ = ["SweepParams", "sweep", "prepare_sweep"]


class SweepParams(_Params):
    name: str = Field(
        pattern=r"^[A-Za-z0-9._-]+$",
        max_length=80,
        description="the sweep's name: its folder {store}/sweeps/{name}, its study, and its trials' run "
        "names {name}-tNNN",
    )
    space: SweepSpace = Field(description="what the trials search (flows/sweep_space.py)")
    run: PretrainParams = Field(
        default_factory=PretrainParams,
        description="every trial's pretrain parameters (store, executor, evaluation, resubmission ...); "
        "the preset, overrides and run name come from the sweep",
    )
    pruner: Literal["none", "median", "halving", "hyperband"] = Field(
        "halving",
        description="stop trials that are clearly behind at a rung: Optuna's median rule, successive "
        "halving or Hyperband over the val loss at each validation",
    )
    min_steps: int = Field(
        0, ge=0, description="no trial is pruned before this step (0: the preset's val_every)"
    )
    reduction_factor: int = Field(
        3, ge=2, description="halving and Hyperband: the fraction 1/this of a rung goes on"
    )
    scaling: bool = Field(
        False,
        description="fit the completed trials' final val loss against their training compute "
        "(L = E + A * C^-alpha: a sweep over model sizes or tokens is a scaling study's first step) and "
        "plot it with its residuals",
    )
    promote: list[int] = Field(
        default_factory=list,
        description="pruned trials (their numbers) to run to their end first, each resumed from the "
        "checkpoint it was pruned at",
    )
    study_url: str | None = Field(
        None,
        description="an Optuna storage URL (a database the sweep's flow runs share, e.g. "
        "postgresql://host/db; its password from the worker's environment, e.g. PGPASSWORD); "
        "default: SQLite in the sweep's folder, for a store that is a local or shared filesystem",
    )

    @model_validator(mode="after")
    def _sweep_owns_the_trials(self) -> SweepParams:
        if self.run.overrides:
            raise ValueError(
                "run.overrides: a trial's overrides are the sweep's: put fixed ones in space.overrides"
            )
        if self.study_url and has_password(self.study_url):
            raise ValueError(
                "study_url carries a password: credentials are never parameters (the UI shows and stores "
                "them); give it through the worker's environment"
            )
        return self

    def folder(self) -> SweepDir:
        return self.run.store_layout().sweep(self.name)

    def trial_name(self, number: int) -> str:
        return f"{self.name}-t{number:03d}"

    def storage_url(self) -> str:
        if self.study_url:
            return self.study_url
        db = self.folder().study_db
        if not store.is_local(db):
            raise SweepError(
                f"the store {self.run.store} is not a filesystem, so the study cannot live in it as SQLite: "
                "give study_url (a database the sweep's flow runs can reach)"
            )
        path = Path(db.removeprefix("file://")).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"

    def trial_params(self, number: int, overrides: list[str]) -> PretrainParams:
        return self.run.model_copy(
            update={
                "preset": self.space.preset,
                "run_name": self.trial_name(number),
                "overrides": overrides,
            }
        )


# ----------------------------------------------------------------------------- the study


def _optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep logs what matters itself
    return optuna


def _sampler(space: SweepSpace):
    """Optuna's sampler for the space. A grid is its points enqueued in the study (open_study), each asked once:
    Optuna's GridSampler stops the study itself, which only its optimize loop allows."""
    optuna = _optuna()
    if space.sampler in ("grid", "random"):
        return optuna.samplers.RandomSampler(seed=space.seed)
    return optuna.samplers.TPESampler(seed=space.seed)


def _pruner(p: SweepParams):
    optuna = _optuna()
    first = p.min_steps or load_config(p.space.preset, p.space.overrides).eval.val_every
    if p.pruner == "none":
        return optuna.pruners.NopPruner()
    if p.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=first)
    if p.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=first,
            max_resource=load_config(p.space.preset, p.space.overrides).train.max_steps,
            reduction_factor=p.reduction_factor,
        )
    return optuna.pruners.SuccessiveHalvingPruner(
        min_resource=first, reduction_factor=p.reduction_factor
    )


def open_study(p: SweepParams):
    """The sweep's study, created at its first flow run. A study of that name that was made for another space
    (another sweep, or this one changed) is refused: its trials would be compared with others' in one table."""
    optuna = _optuna()
    mine = p.space.model_dump(mode="json")
    folder = p.folder()
    if store.exists(folder.space):
        recorded = store.read_json(folder.space).get("space")
        if recorded != mine:
            raise SweepError(
                f"sweep {p.name!r} exists in {folder.url} with another search space: give this one another "
                "name, or run it with the space it was started with"
            )
    study = optuna.create_study(
        study_name=p.name,
        storage=p.storage_url(),
        sampler=_sampler(p.space),
        pruner=_pruner(p),
        direction="minimize",
        load_if_exists=True,
    )
    recorded = study.user_attrs.get("space")
    if recorded is None:
        study.set_user_attr("space", mine)
    elif recorded != mine:
        raise SweepError(
            f"the study {p.name!r} in {_where(p)} belongs to another sweep (its search space differs): "
            "give this sweep another name"
        )
    if p.space.sampler == "grid":  # each point once, however many flow runs enqueue them
        for point in p.space.grid_points():
            study.enqueue_trial(point, skip_if_exists=True)
    if not store.exists(folder.space):
        store.write_json(folder.space, {"name": p.name, "space": mine})
    return study


def _where(p: SweepParams) -> str:
    return "study_url" if p.study_url else p.folder().study_db


def prepare_sweep(p: SweepParams):
    """Everything that can be known wrong before a trial starts (SweepError, one line each), and the study."""
    p.space.check()
    try:
        check_tracker(p.run)
        check_evaluation(p.run)
    except FlowFailure as err:
        raise SweepError(f"run: {err}") from None
    try:
        store.preflight(p.folder().url, write=True)
    except store.StoreError as err:
        raise SweepError(f"store unreachable: {err}") from None
    return open_study(p)


def suggest(trial, space: SweepSpace) -> dict[str, Value]:
    point: dict[str, Value] = {}
    for d in space.dimensions:
        if d.choices is not None:
            point[d.key] = trial.suggest_categorical(d.key, d.choices)
        elif space.sampler == "grid":  # the enqueued point's value
            point[d.key] = trial.suggest_categorical(d.key, d.grid())
        elif d.integer:
            assert d.low is not None and d.high is not None
            point[d.key] = trial.suggest_int(d.key, int(d.low), int(d.high), log=d.log)
        else:
            assert d.low is not None and d.high is not None
            point[d.key] = trial.suggest_float(d.key, d.low, d.high, log=d.log)
    return point


# ----------------------------------------------------------------------------- one trial


class TrialRunner:
    """One trial: its pretrain run as a child flow run, its val losses reported to the study as they appear,
    a hold when the pruner says so, and its end told to the study."""

    def __init__(self, p: SweepParams, study, trial, log):
        self.p, self.study, self.trial, self.log = p, study, trial, log
        self.number = trial.number
        self.name = p.trial_name(self.number)
        self.run = p.run.store_layout().run(self.name)
        self.pruned_at: int | None = None

    async def run_to_end(self, overrides: list[str], adopted: bool) -> dict[str, Any]:
        optuna = _optuna()
        params = self.p.trial_params(self.number, overrides)
        self.log.info(
            "trial %d (%s)%s: %s",
            self.number,
            self.name,
            " adopted from an earlier flow run" if adopted else "",
            " ".join(overrides[len(self.p.space.overrides) :]) or "the base config",
        )
        child = pretrain.with_options(flow_run_name=self.name)
        reporter = asyncio.create_task(self.report_rungs())
        t0 = time.time()
        state, result, message = "failed", None, ""
        try:
            result = await child(params)
            state = "pruned" if result.get("held") else "completed"
        except FlowFailure as err:
            message = str(err)
        except Exception as err:  # the trial's own failure; the sweep goes on
            message = f"{type(err).__name__}: {err}"
        finally:
            reporter.cancel()
        record = trial_record(
            self.run, self.number, state, result, message, time.time() - t0, params.world_size()
        )
        self.trial.set_user_attr("result", record)
        if state == "completed" and record["final_val_loss"] is not None:
            self.study.tell(self.trial, record["final_val_loss"])
        elif state == "pruned":
            self.study.tell(self.trial, state=optuna.trial.TrialState.PRUNED)
        else:
            self.study.tell(self.trial, state=optuna.trial.TrialState.FAIL)
        self.log.info(
            "trial %d (%s) %s%s",
            self.number,
            self.name,
            state,
            f": {message}" if message else f", val loss {record['final_val_loss']}",
        )
        return record

    async def report_rungs(self) -> None:
        """Every new validation of the run, reported at its step; a hold on the run once the pruner says so."""
        # what an earlier flow run reported already (the storage API: a Trial has no public reader of it)
        seen = set(self.study._storage.get_trial(self.trial._trial_id).intermediate_values)
        while True:
            await asyncio.sleep(max(self.p.run.poll_seconds, 1.0))
            rows = await asyncio.to_thread(read_metrics, self.run.url)
            new = [r for r in rows if "val_loss" in r and r["step"] not in seen and r["step"] > 0]
            for r in new:
                seen.add(r["step"])
                self.trial.report(float(r["val_loss"]), int(r["step"]))
            if new and self.trial.should_prune():
                step, val = new[-1]["step"], new[-1]["val_loss"]
                self.pruned_at = step
                reason = (
                    f"pruned at step {step}: val loss {val:.4f} is behind the other trials there"
                )
                await asyncio.to_thread(request_hold, self.run, f"sweep {self.p.name}", reason)
                self.log.info("trial %d (%s) %s", self.number, self.name, reason)
                return


def trial_record(
    run: RunDir,
    number: int,
    state: str,
    result: dict[str, Any] | None,
    message: str,
    seconds: float,
    world_size: int,
) -> dict[str, Any]:
    """What the sweep keeps of a trial's run (in the study, beside the trial): its state, losses, progress,
    best evaluation and cost."""
    metrics = read_metrics(run.url)
    vals = [m["val_loss"] for m in metrics if "val_loss" in m]
    busy_s = sum(m.get("step_ms", 0.0) for m in metrics) / 1000
    best = (result or {}).get("best_checkpoint") or {}
    return {
        "trial": number,
        "run": run.url.rstrip("/").rsplit("/", 1)[-1],
        "state": state,
        "final_val_loss": vals[-1] if vals else None,
        "best_val_loss": min(vals) if vals else None,
        "final_step": metrics[-1]["step"] + 1 if metrics else 0,
        "tokens": metrics[-1].get("tokens_seen", 0) if metrics else 0,
        "eval": {best["metric"]: best["value"]} if best else {},
        # device-hours: the training steps' time on every process of the run
        "device_hours": round(busy_s * world_size / 3600, 4),
        "minutes": round(seconds / 60, 2),
        "message": message[:500],
    }


async def promote(p: SweepParams, study, frozen, log) -> dict[str, Any]:
    """A pruned trial run to its end: its pretrain run again, which clears the hold and resumes from the
    checkpoint it stopped at. Optuna keeps the trial as pruned (a finished trial does not change); the result
    is kept beside it in the study, and the sweep's table shows both."""
    name = p.trial_name(frozen.number)
    params = p.trial_params(frozen.number, frozen.user_attrs["overrides"])
    log.info("promoting trial %d (%s): resuming it from its checkpoint", frozen.number, name)
    t0 = time.time()
    state, result, message = "failed", None, ""
    try:
        result = await pretrain.with_options(flow_run_name=f"{name}-promoted")(params)
        state = "completed"
    except Exception as err:
        message = str(err) if isinstance(err, FlowFailure) else f"{type(err).__name__}: {err}"
    run = p.run.store_layout().run(name)
    record = trial_record(
        run, frozen.number, state, result, message, time.time() - t0, params.world_size()
    )
    study.set_user_attr(f"promoted-{frozen.number}", record)
    log.info("promoted trial %d (%s) %s", frozen.number, name, message or state)
    return record


# ----------------------------------------------------------------------------- the sweep


async def run_sweep(p: SweepParams) -> dict[str, Any]:
    """The flow's body. Call inside a flow run."""
    log = get_run_logger()
    try:
        study = await asyncio.to_thread(prepare_sweep, p)
    except (SweepError, BadInput) as err:
        raise FlowFailure(f"bad parameter: {err}") from None
    folder = p.folder()
    lease = Lease(
        folder.lease("flow"),
        f"sweep flow run {current_run.name or '?'}",
        identity=str(current_run.id or ""),
    )
    try:
        await asyncio.to_thread(lease.acquire)
    except LeaseHeld as err:
        raise FlowFailure(str(err)) from None
    try:
        # the data once, before the trials (each would otherwise prepare the same shards at once)
        first = p.trial_params(0, p.space.overrides)
        try:
            cfg, _ = resolve_config(first)
        except Exception as err:
            raise FlowFailure(f"bad parameter: {err}") from None
        await ensure_data(cfg, first)
        return await SweepDriver(p, study, log).run()
    finally:
        await asyncio.to_thread(lease.release)


class SweepDriver:
    def __init__(self, p: SweepParams, study, log):
        self.p, self.study, self.log = p, study, log
        self.key = f"sweep-{artifact_key(p.name)}"
        self.records: dict[int, dict[str, Any]] = {}

    def promoted(self) -> dict[int, dict[str, Any]]:
        return {
            int(k.split("-", 1)[1]): v
            for k, v in self.study.user_attrs.items()
            if k.startswith("promoted-")
        }

    def _all(self):
        """Every trial asked so far (a grid's points wait in the study until they are asked)."""
        waiting = _optuna().trial.TrialState.WAITING
        return [t for t in self.study.get_trials(deepcopy=False) if t.state != waiting]

    async def run(self) -> dict[str, Any]:
        optuna = _optuna()
        running_state = optuna.trial.TrialState.RUNNING
        for t in self._all():
            if "result" in t.user_attrs:
                self.records[t.number] = t.user_attrs["result"]
        await self.promote_asked()
        # trials an earlier flow run left running: adopted first, never asked again
        adopt = [t for t in self._all() if t.state == running_state]
        if adopt:
            self.log.info(
                "adopting %d trial(s) left running by an earlier flow run: %s",
                len(adopt),
                ", ".join(self.p.trial_name(t.number) for t in adopt),
            )
        tasks: dict[asyncio.Task, int] = {}
        while True:
            while len(tasks) < self.p.space.max_concurrent:
                started = self._start_next(adopt)
                if started is None:
                    break
                tasks[started[0]] = started[1]
            if not tasks:
                break
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                number = tasks.pop(task)
                self.records[number] = task.result()
            await self.publish()
        await self.publish()
        out = self.summary()
        if self.p.scaling:
            out["scaling"] = await self.fit_scaling()
        return out

    async def promote_asked(self) -> None:
        """The trials of `promote`, pruned ones, run to their end (one after the other, before new trials)."""
        pruned = _optuna().trial.TrialState.PRUNED
        trials = {t.number: t for t in self._all()}
        done = self.promoted()
        for number in self.p.promote:
            t = trials.get(number)
            if t is None or t.state != pruned:
                raise FlowFailure(
                    f"bad parameter: promote has trial {number}, which is "
                    + ("not in the study" if t is None else f"{t.state.name.lower()}, not pruned")
                )
            if done.get(number, {}).get("state") == "completed":
                self.log.info("trial %d was promoted and completed already", number)
                continue
            await promote(self.p, self.study, t, self.log)
            await self.publish()

    def _start_next(self, adopt: list) -> tuple[asyncio.Task, int] | None:
        """The next trial's task: an adopted one, else a new one while the budget lasts."""
        optuna = _optuna()
        while adopt:
            frozen = adopt.pop(0)
            trial = optuna.trial.Trial(self.study, frozen._trial_id)
            overrides = frozen.user_attrs.get("overrides")
            if overrides is None:  # its flow run died between asking and starting it: nothing ran
                keys = [d.key for d in self.p.space.dimensions]
                if not set(keys) <= set(frozen.params):
                    self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    self.log.warning(
                        "trial %d was left half-asked by an earlier flow run", frozen.number
                    )
                    continue
                overrides = self.p.space.trial_overrides({k: frozen.params[k] for k in keys})
                trial.set_user_attr("overrides", overrides)
            runner = TrialRunner(self.p, self.study, trial, self.log)
            return asyncio.create_task(runner.run_to_end(overrides, adopted=True)), frozen.number
        if len(self._all()) >= self.p.space.trials:
            return None
        trial = self.study.ask()
        point = suggest(trial, self.p.space)
        overrides = self.p.space.trial_overrides(point)
        # recorded before the run starts: a restarted sweep runs this trial again with these, not new ones
        trial.set_user_attr("overrides", overrides)
        trial.set_user_attr("run", self.p.trial_name(trial.number))
        runner = TrialRunner(self.p, self.study, trial, self.log)
        return asyncio.create_task(runner.run_to_end(overrides, adopted=False)), trial.number

    def rows(self) -> list[dict[str, Any]]:
        rows = []
        promoted = self.promoted()
        for t in sorted(self._all(), key=lambda t: t.number):
            rec = self.records.get(t.number, {})
            if t.number in promoted:  # its latest result; the state says it was pruned first
                rec = {
                    **promoted[t.number],
                    "state": f"pruned, promoted: {promoted[t.number]['state']}",
                }
            rows.append(
                {
                    "trial": t.number,
                    "run": self.p.trial_name(t.number),
                    **{k: _short(v) for k, v in t.params.items()},
                    "state": rec.get("state", t.state.name.lower()),
                    "best val loss": _num(rec.get("best_val_loss")),
                    "final val loss": _num(rec.get("final_val_loss")),
                    **{k: _num(v) for k, v in rec.get("eval", {}).items()},
                    "step": rec.get("final_step", ""),
                    "tokens": rec.get("tokens", ""),
                    "device-hours": rec.get("device_hours", ""),
                }
            )
        return rows

    def winner(self) -> dict[str, Any] | None:
        done = [
            r for r in self.records.values() if r["state"] == "completed" and r["final_val_loss"]
        ]
        done += [
            r for r in self.promoted().values() if r["state"] == "completed" and r["final_val_loss"]
        ]
        if not done:
            return None
        best = min(done, key=lambda r: r["final_val_loss"])
        params = next(t.params for t in self._all() if t.number == best["trial"])
        return {**best, "params": params}

    async def publish(self) -> None:
        rows = self.rows()
        await acreate_table_artifact(
            rows, key=f"{self.key}-trials", description=f"sweep {self.p.name}: every trial"
        )
        png = await asyncio.to_thread(self.render_curves)
        win = self.winner()
        lines = [f"## sweep {self.p.name}", ""]
        if win:
            lines.append(
                f"winner: trial {win['trial']} (`{win['run']}`), final val loss "
                f"{win['final_val_loss']:.4f}: "
                + ", ".join(f"`{k}={v}`" for k, v in win["params"].items())
            )
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["state"]] = counts.get(r["state"], 0) + 1
        lines += ["", ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))]
        if png:
            lines += [
                "",
                f"![every trial's val loss](data:image/png;base64,{base64.b64encode(png).decode()})",
            ]
        await acreate_markdown_artifact(
            "\n".join(lines), key=f"{self.key}-summary", description=f"sweep {self.p.name}"
        )

    def render_curves(self) -> bytes | None:
        from evaluation.plots import render_trials_png

        curves = {}
        for t in self._all():
            name = self.p.trial_name(t.number)
            rows = read_metrics(self.p.run.store_layout().run(name).url)
            pts = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
            if pts:
                state = self.records.get(t.number, {}).get("state", "running")
                curves[f"{name} ({state})"] = pts
        if not curves:
            return None
        png = render_trials_png(curves, f"sweep {self.p.name}: val loss")
        store.write_bytes(self.p.folder().curves, png)
        return png

    def compute_of(self, number: int, tokens: float) -> float:
        """A trial's training compute: FLOPs per token of its model at its sequence length, times its tokens."""
        from training.memory import num_parameters
        from training.model import flops_per_token

        t = next(t for t in self._all() if t.number == number)
        cfg = load_config(self.p.space.preset, t.user_attrs["overrides"])
        n = num_parameters(cfg.model)
        return flops_per_token(cfg.model, n, cfg.train.seq_len) * tokens

    async def fit_scaling(self) -> dict[str, Any]:
        """The completed trials' final val loss against their compute: the fit, its plot, the exponent."""
        from evaluation.scaling import fit_power_law, render_png

        done = sorted(
            (r for r in self.records.values() if r["state"] == "completed" and r["final_val_loss"]),
            key=lambda r: r["trial"],
        )
        compute = [self.compute_of(r["trial"], r["tokens"]) for r in done]
        loss = [r["final_val_loss"] for r in done]
        try:
            fit = fit_power_law(compute, loss)
        except BadInput as err:
            self.log.warning("no scaling fit: %s", err)
            return {"error": str(err)}
        png = render_png(compute, loss, fit, labels=[r["run"] for r in done])
        url = store.join(self.p.folder().url, "scaling.png")
        store.write_bytes(url, png)
        self.log.info("scaling fit over %d trials: %s", len(done), fit.describe())
        await acreate_markdown_artifact(
            f"## sweep {self.p.name}: loss against compute\n\n{fit.describe()}\n\n"
            f"![fit and residuals](data:image/png;base64,{base64.b64encode(png).decode()})\n\n`{url}`\n",
            key=f"{self.key}-scaling",
            description=f"sweep {self.p.name}: scaling fit",
        )
        return {
            "E": fit.E,
            "A": fit.A,
            "alpha": fit.alpha,
            "rmse": fit.rmse,
            "points": [[c, v] for c, v in zip(compute, loss, strict=True)],
            "plot": url,
        }

    def summary(self) -> dict[str, Any]:
        win = self.winner()
        states = [r["state"] for r in self.records.values()]
        return {
            "sweep": self.p.name,
            "study": _where(self.p),
            "trials": len(self._all()),
            "completed": states.count("completed"),
            "pruned": states.count("pruned"),
            "failed": states.count("failed"),
            "promoted": sorted(self.promoted()),
            "winner": win,
            "curves": self.p.folder().curves,
        }


def _num(x: Any) -> Any:
    return round(x, 4) if isinstance(x, float) else ("" if x is None else x)


def _short(v: Any) -> Any:
    return f"{v:.4g}" if isinstance(v, float) else v


@flow(name="pretrain-sweep", log_prints=True)
async def sweep(params: SweepParams) -> dict[str, Any]:
    """Many pretrain runs over one search space: chosen and pruned by Optuna, at most N at once, restartable."""
    return await run_sweep(params)


# ----------------------------------------------------------------------------- CLI


def read_params(text: str) -> SweepParams:
    try:
        return SweepParams.model_validate(read_json_object(text, "--params"))
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "params"
        raise BadInput(f"--params: {where}: {first['msg']}") from None


@entry_point
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.sweep", description=__doc__.split("\n\n")[0])
    how = ap.add_mutually_exclusive_group(required=True)
    how.add_argument("--params", help="a SweepParams JSON object, or a file of one")
    how.add_argument(
        "--demo",
        action="store_true",
        help="the demo sweep: four learning rates of the demo model, two at a time, on ./store",
    )
    args = ap.parse_args(argv)
    if args.demo:
        from flows.serve import demo_sweep_params

        # through JSON: under `python -m` this module is __main__, whose SweepParams is the flow's type
        params = SweepParams.model_validate(demo_sweep_params("store").model_dump(mode="json"))
    else:
        params = read_params(args.params)
    prepare_sweep(params)  # bad input: one line, exit 2, before any flow run or trial
    problem = api_problem()
    if problem:
        raise BadInput(problem)
    quiet_temporary_server()
    result = asyncio.run(sweep(params))
    print(json.dumps(result, indent=2, default=str))
    return exit_codes.OK


if __name__ == "__main__":
    raise SystemExit(main())
