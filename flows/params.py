"""The `pretrain-gpt2` flow's parameters: one typed model, so the Prefect UI renders a form with defaults
and validation. Credentials are never parameters (the UI shows and stores parameters): they come from the
environment of the worker and the jobs."""

from __future__ import annotations

import argparse
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cluster.resubmission import BACKOFF_SECONDS, MAX_RESUBMITS, MAX_ROLLBACKS
from cluster.spec import JobSpec
from common.cli import add_model_flags, model_from_flags
from common.heartbeat import HangRules
from common.layout import RunDir, StoreLayout
from common.secrets import has_password


class _Params(BaseModel):
    # hide_input_in_errors: an error never repeats a value that may be a secret (the UI shows errors)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, hide_input_in_errors=True)


class EvaluationParams(_Params):
    """Every checkpoint evaluated as it appears."""

    tasks: list[str] = Field(
        default_factory=lambda: ["hellaswag"], description="evaluation per checkpoint"
    )
    hellaswag_data: str | None = Field(
        None, description="HellaSwag jsonl (default: {store}/data/hellaswag/...)"
    )
    include_path: str | None = Field(
        None,
        description="a local folder of lm-eval task YAMLs (tasks over "
        "local files, for machines without hub access)",
    )
    slurm: JobSpec | None = Field(
        None,
        description="run each checkpoint's evaluation as its own Slurm job "
        "(one node, e.g. one GPU); default: a process next to the flow",
    )


class ResubmissionParams(_Params):
    """What the flow does when a submission ends (cluster/resubmission.py) and where it runs next."""

    max_resubmits: int = Field(
        MAX_RESUBMITS, ge=0, description="resubmissions after failures (requeues don't count)"
    )
    max_rollbacks: int = Field(
        MAX_ROLLBACKS,
        ge=0,
        description="rollbacks past diverging data (training's guard) before the run stops",
    )
    backoff_seconds: float = Field(
        BACKOFF_SECONDS,
        ge=0,
        description="wait before resubmitting a failed submission (doubled "
        "with each further failure)",
    )
    cordon_hours: float = Field(
        24.0,
        ge=0,
        description="a host a failure points at (a hang's silent ranks, a "
        "node failure) is kept out of the run's next submissions this long; 0 = never",
    )
    allow_shrink: bool = Field(
        False,
        description="when cordoned hosts leave the partition fewer nodes than the "
        "job asks for, resubmit on the nodes left (the global batch stays: more gradient "
        "accumulation) instead of stopping the run",
    )


class HangParams(_Params):
    """A job whose steps stop while it still looks alive (from its ranks' heartbeats)."""

    detection: bool = Field(
        True,
        description="cancel and resubmit a job whose steps stop (from its ranks' "
        "heartbeats, train.heartbeat_seconds)",
    )
    factor: float = Field(
        20.0, gt=0, description="hung: no new step for this many median step times ..."
    )
    floor_s: float = Field(
        300.0,
        gt=0,
        description="... nor for this many seconds (covers checkpoint writes, "
        "validation and recompilation)",
    )
    startup_timeout_s: float = Field(
        1800.0,
        gt=0,
        description="hung: no first step this long after the job started "
        "running (rendezvous, data, torch.compile)",
    )

    def rules(self, heartbeat_s: float, poll_s: float) -> HangRules | None:
        """The detector's rules for a run whose ranks beat every `heartbeat_s` (None: detection is off)."""
        if not self.detection or heartbeat_s <= 0:
            return None
        silent_s = 3 * heartbeat_s + 2 * poll_s  # a rank that skipped three beats and two polls
        return HangRules(self.factor, self.floor_s, self.startup_timeout_s, silent_s=silent_s)


class StragglerParams(_Params):
    """A rank the others keep waiting for (from the telemetry in the metrics lines)."""

    margin: float = Field(
        0.10,
        gt=0,
        description="a straggler: the slowest rank (most busy time per "
        "step: its own data wait, forward and backward, training/telemetry.py), more "
        "than this fraction above the median rank's ...",
    )
    windows: int = Field(
        3,
        ge=1,
        description="... in this many telemetry windows in a row "
        "(train.telemetry_every steps each): one warning in the log and a row in the "
        "events table",
    )


class TrackerParams(_Params):
    """The run mirrored into an experiment tracker from the flow's side (flows/tracker.py)."""

    kind: Literal["none", "mlflow", "wandb", "tensorboard"] = Field(
        "none",
        description="mirror the run into an experiment "
        "tracker, from the flow's side: one tracker run per run "
        "directory; the training nodes need neither its library "
        "nor its credentials (MLFLOW_TRACKING_TOKEN or _USERNAME/"
        "_PASSWORD, WANDB_API_KEY: the worker's environment or "
        "credentials_secret)",
    )
    project: str = Field(
        "gpt2-repro", min_length=1, description="the MLflow experiment or W&B project"
    )
    uri: str | None = Field(
        None,
        description="MLflow tracking URI (default: the worker's "
        "MLFLOW_TRACKING_URI); TensorBoard log folder, a path or URL (default: "
        "{run}/tensorboard)",
    )
    entity: str | None = Field(None, description="W&B entity (default: the API key's)")
    sweep: str | None = Field(
        None,
        description="the sweep folder whose tracker run is this run's parent (pretrain-sweep sets it for "
        "its trials: an MLflow child run, a run of the sweep's W&B group)",
    )
    interval_s: float = Field(
        15.0, gt=0, description="seconds between two deliveries to the tracker"
    )
    finish_timeout_s: float = Field(
        120.0,
        ge=0,
        description="at the flow's end, how long the mirror may "
        "wait for a tracker that does not answer before it leaves the rest "
        "to `python -m tracking.mirror`",
    )


# The flat names of the grouped fields (parameters of earlier versions, and the CLI's flags): each is accepted
# where the parameters are read (the UI, deployments, --params) and nested into its section.
FLAT_NAMES: dict[str, tuple[str, str]] = {
    "eval_tasks": ("evaluation", "tasks"),
    "hellaswag_data": ("evaluation", "hellaswag_data"),
    "eval_include_path": ("evaluation", "include_path"),
    "eval_slurm": ("evaluation", "slurm"),
    **{f: ("resubmission", f) for f in ResubmissionParams.model_fields},
    "hang_detection": ("hang", "detection"),
    "hang_factor": ("hang", "factor"),
    "hang_floor_s": ("hang", "floor_s"),
    "startup_timeout_s": ("hang", "startup_timeout_s"),
    "straggler_margin": ("stragglers", "margin"),
    "straggler_windows": ("stragglers", "windows"),
    "tracker": ("tracker", "kind"),
    **{f"tracker_{f}": ("tracker", f) for f in TrackerParams.model_fields if f != "kind"},
}


class PretrainParams(_Params):
    preset: str = Field(
        "tiny",
        description="run preset in configs/ (tiny, demo, gpt2-124m, gpt2-350m, gpt2-774m, "
        "gpt2-1558m) or a TOML path",
    )
    store: str = Field(
        "store", description="store root (fsspec URL): data/ and runs/ live under it"
    )
    run_name: str = Field(
        "tiny-demo", pattern=r"^[A-Za-z0-9._-]+$", description="run directory name under runs/"
    )
    data: str | None = Field(
        None,
        description="token shards URL (default: the preset's dataset in the store, "
        "{store}/data/{dataset})",
    )
    overrides: list[str] = Field(
        default_factory=list, description="extra `key=value` config overrides"
    )
    executor: Literal["local", "slurm"] = Field(
        "local",
        description="where training runs: a local subprocess, or a Slurm job shaped by `slurm`",
    )
    nproc: int = Field(
        1, ge=1, description="local executor: processes (torchrun --standalone when > 1)"
    )
    slurm: JobSpec = Field(
        default_factory=JobSpec, description="the Slurm job of each attempt (executor=slurm)"
    )
    prepare_source: str | None = Field(
        None,
        description="when the data URL holds no shards yet: build them from "
        "this source (default: the preset's data.source; hf:HuggingFaceFW/fineweb-edu"
        ":sample-10BT, parquet/jsonl files, or demo)",
    )
    shard_tokens: int | None = Field(
        None,
        ge=1,
        description="tokens per shard when the data is prepared (default: 100M, 100k for demo)",
    )
    prepare_slurm: JobSpec | None = Field(
        None,
        description="prepare the data as a Slurm job array over the "
        "source files (CPU nodes); default: in the flow's process",
    )
    credentials_secret: str | None = Field(
        None,
        description="name of a Prefect Secret block holding a JSON object "
        "of environment variables (AWS_ACCESS_KEY_ID, ...) for the store",
    )
    evaluation: EvaluationParams = Field(
        default_factory=EvaluationParams, description=EvaluationParams.__doc__
    )
    resubmission: ResubmissionParams = Field(
        default_factory=ResubmissionParams, description=ResubmissionParams.__doc__
    )
    hang: HangParams = Field(default_factory=HangParams, description=HangParams.__doc__)
    stragglers: StragglerParams = Field(
        default_factory=StragglerParams, description=StragglerParams.__doc__
    )
    tracker: TrackerParams = Field(default_factory=TrackerParams, description=TrackerParams.__doc__)
    poll_seconds: float = Field(
        2.0,
        gt=0,
        description="how often the flow asks for the job's state and reads "
        "its new metrics and log lines (heartbeats: every min(10 s, hang_floor_s / 4))",
    )

    @model_validator(mode="after")
    def _no_passwords(self) -> PretrainParams:
        """Credentials are never parameters: Prefect stores them and shows them in the UI."""
        urls = {
            "store": self.store,
            "data": self.data,
            "prepare_source": self.prepare_source,
            "evaluation.hellaswag_data": self.evaluation.hellaswag_data,
            "evaluation.include_path": self.evaluation.include_path,
            "tracker.uri": self.tracker.uri,
        }
        for name, url in urls.items():
            if url and has_password(url):
                raise ValueError(
                    f"{name} carries a password in its URL: credentials are never parameters (the UI shows "
                    "and stores them); give them through the worker's environment or credentials_secret"
                )
        return self

    @field_validator("run_name")
    @classmethod
    def _not_a_parent(cls, name: str) -> str:
        if name in (".", ".."):  # the store's root or its parent as the run directory
            raise ValueError(f"run_name {name!r} is not a directory name of its own")
        return name

    @model_validator(mode="before")
    @classmethod
    def _nest_flat_names(cls, data: Any) -> Any:
        """`hang_floor_s=60` is `hang.floor_s=60` (a flat name wins over its section's value)."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        if isinstance(out.get("tracker"), str):  # the flat `tracker` names the kind
            out["tracker"] = {"kind": out["tracker"]}
        for flat, (section, field) in FLAT_NAMES.items():
            if flat in out and flat != "tracker":
                value = out.pop(flat)
                nested = out.get(section)
                out[section] = {**(nested if isinstance(nested, dict) else {}), field: value}
        return out

    def world_size(self) -> int:
        return self.slurm.world_size if self.executor == "slurm" else self.nproc

    def store_layout(self) -> StoreLayout:
        return StoreLayout(self.store)

    def run_dir(self) -> RunDir:
        return self.store_layout().run(self.run_name)


def add_flags(ap: argparse.ArgumentParser) -> None:
    """The command line of the flow (`python -m flows.pretrain`): a flag per field, sections' fields under
    their flat names (`--hang-floor-s`, `--eval-tasks`, `--tracker`)."""
    add_model_flags(
        ap,
        PretrainParams,
        aliases={"overrides": ["--set"]},
        comma_lists=["eval_tasks"],
        flat=FLAT_NAMES,
    )


def from_flags(args: argparse.Namespace, base: dict[str, Any] | None = None) -> PretrainParams:
    """The parameters from `base` (a --params JSON object) with the flags given on top."""
    return model_from_flags(PretrainParams, args, base, flat=FLAT_NAMES)
