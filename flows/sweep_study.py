"""A sweep's parameters (`SweepParams`: the space, every trial's pretrain parameters, the pruner, where the
study lives) and its Optuna study: the sampler and pruner they ask for, the study opened or created (and refused
when it belongs to another sweep), everything checked before a trial starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from common import store
from common.layout import SweepDir
from common.secrets import has_password
from flows.params import PretrainParams, TrackerParams, _Params
from flows.pretrain import FlowFailure, check_evaluation, check_tracker
from flows.sweep_space import SweepError, SweepSpace, Value
from training.config import load_config


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
    concurrency_limit: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9._-]+$",
        max_length=80,
        description="a Prefect global concurrency limit (`prefect gcl create trials --limit 8`) that every "
        "trial takes a slot of while it runs: sweeps naming the same limit share it, so together they run "
        "at most that many trials; the others wait (max_concurrent still bounds this sweep's own)",
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
                "tracker": self.trial_tracker(number),
            }
        )

    def trial_tracker(self, number: int) -> TrackerParams:
        """A trial's tracker run is a child of the sweep's; TensorBoard's trials are folders of one log folder
        (the sweep's, or the `uri` given), side by side in one `tensorboard --logdir`."""
        t = self.run.tracker
        if t.kind == "none":
            return t
        update: dict[str, Any] = {"sweep": self.folder().url}
        if t.kind == "tensorboard":
            update["uri"] = store.join(self.tensorboard_root(), self.trial_name(number))
        return t.model_copy(update=update)

    def tensorboard_root(self) -> str:
        return (self.run.tracker.uri or self.folder().tensorboard).rstrip("/")


# ----------------------------------------------------------------------------- the study


def optuna_lib():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep logs what matters itself
    return optuna


def _sampler(space: SweepSpace):
    """Optuna's sampler for the space. A grid is its points enqueued in the study (open_study), each asked once:
    Optuna's GridSampler stops the study itself, which only its optimize loop allows."""
    optuna = optuna_lib()
    if space.sampler in ("grid", "random"):
        return optuna.samplers.RandomSampler(seed=space.seed)
    return optuna.samplers.TPESampler(seed=space.seed)


def _pruner(p: SweepParams):
    optuna = optuna_lib()
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
    optuna = optuna_lib()
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
            f"the study {p.name!r} in {study_location(p)} belongs to another sweep (its search space differs): "
            "give this sweep another name"
        )
    if p.space.sampler == "grid":  # each point once, however many flow runs enqueue them
        for point in p.space.grid_points():
            study.enqueue_trial(point, skip_if_exists=True)
    if not store.exists(folder.space):
        store.write_json(folder.space, {"name": p.name, "space": mine})
    return study


def study_location(p: SweepParams) -> str:
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
        if d.sets is not None:  # a set is drawn by its name
            point[d.key] = trial.suggest_categorical(d.key, list(d.sets))
        elif d.choices is not None:
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
