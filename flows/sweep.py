"""`pretrain-sweep`: many pretrain runs over one search space, chosen and pruned by Optuna, at most N at once,
the study kept in the store so that a restarted sweep goes on where it was.

    python -m flows.sweep --params sweep.json          # a SweepParams JSON object (or the object itself)
    python -m flows.sweep --demo                       # four learning rates of the demo model, on a CPU

Each trial is a full pretrain run (a child flow run of `pretrain-gpt2`, named `{sweep}-tNNN`, in the run
directory of that name): the same resubmission, hang detection, rollback and evaluation as any run. While it
runs, its val losses are reported to the study at their steps; when the pruner says it is behind, the sweep
puts a hold on it (flows/hold.py), so it stops with a checkpoint: a pruned trial is promoted later (`promote`),
its run resumed from that checkpoint to the end. A trial whose run
fails (diverged past the rollback cap, a config its cluster refuses) is recorded as failed and the sweep goes on;
a failure of the cluster is resubmitted by the trial's own flow, as in any run.

Nothing lost, nothing twice: the study (Optuna's SQLite storage in `{store}/sweeps/{sweep}/`, or the database of
`study_url`) holds every trial and its parameters before the trial starts. A sweep flow run that was cancelled
or died leaves its running trials marked running; the next flow run of the same sweep adopts them (their pretrain
runs reattach to their jobs or resume from their checkpoints) before it asks for new ones.

The parts: flows/sweep_space.py (what it searches), flows/sweep_study.py (its parameters and Optuna study),
flows/sweep_trial.py (one trial), this file (the flow: trials at most N at once, the UI, the command line).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact
from prefect.runtime import flow_run as current_run
from prefect.settings import PREFECT_UI_URL
from pydantic import ValidationError

from common import exit_codes, store
from common.cli import entry_point, read_json_object
from common.errors import BadInput
from common.lease import Lease, LeaseHeld
from common.sweep_summary import SweepSummary, TrialSummary, write_summary
from flows.prefect_server import run_flow_here
from flows.pretrain import FlowFailure, ensure_data, resolve_config
from flows.report import artifact_key
from flows.sweep_space import SweepError
from flows.sweep_study import SweepParams, optuna_lib, prepare_sweep, study_location, suggest
from flows.sweep_trial import TrialRunner, check_concurrency_limit, promote
from flows.tracker import TrackerMirror
from tracking.credentials import HELD
from training.config import load_config
from training.metrics import ValCurve

__all__ = ["SweepParams", "sweep", "prepare_sweep"]


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
        await check_concurrency_limit(p)
        await ensure_data(cfg, first)
        return await _with_tracker(p, SweepDriver(p, study, log), log)
    finally:
        await asyncio.to_thread(lease.release)


async def _with_tracker(p: SweepParams, driver: SweepDriver, log) -> dict[str, Any]:
    """The sweep driven, with its tracker run (the parent of its trials' runs) kept up to date beside it by a
    process of its own (tracking/sweep_mirror.py)."""
    t = p.run.tracker
    if t.kind == "none":
        return await driver.run()
    if p.run.credentials_secret:
        from flows.credentials import apply_secret

        await apply_secret(p.run.credentials_secret)
    credentials = HELD.enter(
        os.environ
    )  # the trials' flow runs hold them too (tracking/credentials.py)
    mirror, state = None, "failed"
    try:
        if t.kind == "tensorboard":
            t = t.model_copy(update={"uri": p.tensorboard_root()})
        mirror = await TrackerMirror.start_for_sweep(t, p.folder(), log, credentials)
        result = await driver.run()
        state = "completed"
        return result
    except asyncio.CancelledError:
        state = "stopped"
        raise
    finally:
        if mirror is not None:
            await mirror.finish(state, t.finish_timeout_s + 60)
        HELD.leave(os.environ)


class SweepDriver:
    def __init__(self, p: SweepParams, study, log):
        self.p, self.study, self.log = p, study, log
        self.key = f"sweep-{artifact_key(p.name)}"
        self.records: dict[int, dict[str, Any]] = {}
        self.val_curves: dict[str, ValCurve] = {}

    def promoted(self) -> dict[int, dict[str, Any]]:
        return {
            int(k.split("-", 1)[1]): v
            for k, v in self.study.user_attrs.items()
            if k.startswith("promoted-")
        }

    def _all(self):
        """Every trial asked so far (a grid's points wait in the study until they are asked)."""
        waiting = optuna_lib().trial.TrialState.WAITING
        return [t for t in self.study.get_trials(deepcopy=False) if t.state != waiting]

    async def run(self) -> dict[str, Any]:
        optuna = optuna_lib()
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
            before = len(tasks)
            while len(tasks) < self.p.space.max_concurrent:
                started = self._start_next(adopt)
                if started is None:
                    break
                tasks[started[0]] = started[1]
            if not tasks:
                break
            if (
                len(tasks) > before
            ):  # the page and the tracker's parent run show the trials as they start
                await self.publish()
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                number = tasks.pop(task)
                self.records[number] = task.result()
            await self.publish()
        await self.publish(finished=True)
        out = self.summary()
        if self.p.scaling:
            out["scaling"] = await self.fit_scaling()
        return out

    async def promote_asked(self) -> None:
        """The trials of `promote`, pruned ones, run to their end (one after the other, before new trials)."""
        pruned = optuna_lib().trial.TrialState.PRUNED
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
        optuna = optuna_lib()
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
                    "submissions": rec.get("submissions", ""),
                }
            )
        # one set of columns for all: a trial still running, pruned before its first evaluation or of
        # another sampled shape has fewer of them
        columns = list(dict.fromkeys(k for r in rows for k in r))
        return [{c: r.get(c, "") for c in columns} for r in rows]

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

    def sweep_summary(self, finished: bool = False) -> SweepSummary:
        """The typed summary a tracker's parent run shows (common/sweep_summary.py)."""
        trials, promoted = [], self.promoted()
        for t in sorted(self._all(), key=lambda t: t.number):
            rec = self.records.get(t.number, {})
            state = rec.get("state", t.state.name.lower())
            if t.number in promoted:
                rec = promoted[t.number]
                state = f"pruned, promoted: {rec['state']}"
            trials.append(
                TrialSummary(
                    trial=t.number,
                    run=self.p.trial_name(t.number),
                    params=dict(t.params),
                    state=state,
                    best_val_loss=rec.get("best_val_loss"),
                    final_val_loss=rec.get("final_val_loss"),
                    evals=rec.get("eval", {}),
                    step=rec.get("final_step", 0),
                    tokens=rec.get("tokens", 0),
                    device_hours=rec.get("device_hours", 0.0),
                    submissions=rec.get("submissions", 0),
                    interruptions=rec.get("interruptions", []),
                )
            )
        win = self.winner()
        settings = {
            "space": self.p.space.model_dump(mode="json"),
            **self.p.model_dump(mode="json", include={"pruner", "min_steps", "reduction_factor"}),
        }
        return SweepSummary(
            sweep=self.p.name,
            url=self.p.folder().url,
            settings=settings,
            trials=trials,
            winner=win["trial"] if win else None,
            finished=finished,
        )

    async def publish(self, finished: bool = False) -> None:
        """The sweep's page and summary file brought up to date; a failure to do so is said, and the trials
        go on."""
        try:
            await asyncio.to_thread(write_summary, self.sweep_summary(finished))
        except Exception as err:
            self.log.warning("the sweep's summary was not written: %s: %s", type(err).__name__, err)
        try:
            await self._publish()
        except Exception as err:
            self.log.warning("the sweep's page was not updated: %s: %s", type(err).__name__, err)

    async def _publish(self) -> None:
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
        lines += ["", ", ".join(f"{n} {s}" for s, n in sorted(counts.items())), ""]
        lines += await self.linked_table(rows)
        if png:
            lines += [
                "",
                f"![every trial's val loss](data:image/png;base64,{base64.b64encode(png).decode()})",
            ]
        await acreate_markdown_artifact(
            "\n".join(lines), key=f"{self.key}-summary", description=f"sweep {self.p.name}"
        )

    async def linked_table(self, rows: list[dict[str, Any]]) -> list[str]:
        """The trials as a markdown table, each run named with a link to its flow run's page (its latest, by
        name: a promoted trial's resumption is a flow run of its own)."""
        links = await self.flow_run_links([r["run"] for r in rows])
        if not rows:
            return []
        cols = [c for c in rows[0] if c != "trial"]
        out = ["| trial | " + " | ".join(cols) + " |", "| ---: |" + " --- |" * len(cols)]
        for r in rows:
            cells = [
                f"[{r['run']}]({links[r['run']]})"
                if c == "run" and r["run"] in links
                else str(r[c])
                for c in cols
            ]
            out.append(f"| {r['trial']} | " + " | ".join(cells) + " |")
        return out

    async def flow_run_links(self, names: list[str]) -> dict[str, str]:
        ui = PREFECT_UI_URL.value()
        if not ui or not names:
            return {}
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
        from prefect.client.schemas.sorting import FlowRunSort

        try:
            async with get_client() as client:
                found = await client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=names)),
                    sort=FlowRunSort.START_TIME_ASC,
                )
        except Exception as err:  # the table goes without links rather than not at all
            self.log.warning("no links to the trials' flow runs: %s", err)
            return {}
        return {r.name: f"{ui.rstrip('/')}/runs/flow-run/{r.id}" for r in found}  # the latest wins

    def render_curves(self) -> bytes | None:
        from evaluation.plots import render_trials_png

        curves = {}
        for t in self._all():
            name = self.p.trial_name(t.number)
            # each page update reads what the trials added since the last
            if name not in self.val_curves:
                self.val_curves[name] = ValCurve(self.p.run.store_layout().run(name).url)
            pts = self.val_curves[name].read()
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
            "study": study_location(self.p),
            "trials": len(self._all()),
            "completed": states.count("completed"),
            "pruned": states.count("pruned"),
            "failed": states.count("failed"),
            "promoted": sorted(self.promoted()),
            # trials the cluster failed and their flow runs resubmitted (the search never saw it)
            "resubmitted": {
                r["run"]: r["interruptions"]
                for r in sorted(self.records.values(), key=lambda r: r["trial"])
                if r.get("interruptions")
            },
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
        from evaluation.demo_task import build as stage_demo_task
        from flows.serve import demo_sweep_params

        stage_demo_task("store")  # the trials' evaluation task, checked before any trial starts
        # through JSON: under `python -m` this module is __main__, whose SweepParams is the flow's type
        params = SweepParams.model_validate(demo_sweep_params("store").model_dump(mode="json"))
    else:
        params = read_params(args.params)
    prepare_sweep(params)  # bad input: one line, exit 2, before any flow run or trial
    run_flow_here(sweep, params)
    return exit_codes.OK


if __name__ == "__main__":
    raise SystemExit(main())
