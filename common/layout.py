"""Where everything lives in a store and in a run directory: every path is named here and nowhere else.

    {store}/data/{dataset}/                 token shards + manifest.json (data_prep writes, training reads)
    {store}/data/hellaswag/hellaswag_val.jsonl
    {store}/data/demo-eval/                 the demo's HellaSwag-format task + its lm-eval YAML
    {store}/runs/{run}/                     a run directory (RunDir below)
        config.json                         the resolved run config (training)
        metrics.jsonl                       one JSON object per step (training)
        telemetry.jsonl                     every rank's step, busy and data-wait times, memory, GPU clock,
                                            temperature and power, one line per window (training/telemetry.py)
        samples.jsonl, result.json          samples during training; the last process's result (training)
        attempts.jsonl                      every start, requeue and end of a Slurm job (cluster launcher)
        events.jsonl                        every skipped update and a divergence (training's guard)
        rollbacks.jsonl, rolled-back/       every rollback past diverging data; the checkpoints it set aside (flow)
        submissions.jsonl, job.json         every job the flow submitted; the one in flight (flow)
        cordon.jsonl                        hosts kept out of the run's next submissions, until they expire (flow)
        evaluations.jsonl                   every checkpoint's evaluation summary, kept after retention prunes it (flow)
        stragglers.jsonl                    every rank found keeping the others waiting (flow, from telemetry)
        trackers/{tracker}.json             the tracker run mirroring this run, and what it holds (tracking.mirror)
        tensorboard/                        TensorBoard event files (tracker=tensorboard, by default)
        curves.png                          loss and HellaSwag curves (flow, evaluation.plots)
        hold.json                           a request to stop with a checkpoint and stay stopped (a sweep's
                                            pruner; flows/hold.py)
        faults/{fault}.json                 a fault injected on purpose that has happened once (training/faults.py)
        logs/submission-NNN.log             console of a local submission (flow, local executor)
        leases/trainer.json, leases/flow.json   who writes the run now (common/lease.py)
        heartbeats/rank-NNNNN.json          each rank's last heartbeat: step, phase, host (common/heartbeat.py)
        nccl-traces/{job}/rank_N            NCCL flight-recorder dumps of a timed-out collective (CUDA, local run dir)
        profiles/steps_A-B/rank-NNNNN.json  a torch.profiler trace of steps A..B-1 (train.profile_steps)
        checkpoints/step_NNNNNN/            one checkpoint (training/checkpoint.py has the files inside)
            eval/hellaswag.json, eval/lm_eval.json     its evaluations (evaluation); a checkpoint outside a
                                            run directory keeps its Hugging Face export in eval/hf-export/
        exports/step_NNNNNN-hf/             its Hugging Face export (evaluation, training.export_hf)
    {store}/sweeps/{sweep}/                 an experiment (SweepDir below; flows/sweep.py): its trials are
                                            run directories runs/{sweep}-tNNN
        sweep.json                          what it searches (the space), fixed at its first flow run
        study.db                            the Optuna study (SQLite), unless the sweep names a database
        curves.png, leases/flow.json        every trial's val loss; the one flow run driving it
        summary.json                        every trial's parameters, state and results (common/sweep_summary.py)
        trackers/{tracker}.json             the tracker run that is its trials' parent (tracking/sweep_mirror.py)
        tensorboard/{trial}/                the trials' TensorBoard folders, side by side (tracker=tensorboard)

Every path is an fsspec URL (a local path, s3://...). Nothing here touches the store.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

from common.store import join

LOCAL_STORE = "store"  # the store of runs started without one: ./store
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


@dataclass(frozen=True)
class StoreLayout:
    root: str

    def dataset(self, name: str) -> str:
        """The shards of dataset `name` (e.g. "fineweb-edu/sample-10BT", "demo")."""
        return join(self.root, "data", name)

    @property
    def hellaswag(self) -> str:
        return join(self.root, "data", "hellaswag", "hellaswag_val.jsonl")

    @property
    def demo_eval(self) -> str:
        """The demo's HellaSwag-format task and its lm-eval definition (evaluation/demo_task.py)."""
        return join(self.root, "data", "demo-eval")

    def run(self, name: str) -> RunDir:
        return RunDir(join(self.root, "runs", name))

    def sweep(self, name: str) -> SweepDir:
        return SweepDir(join(self.root, "sweeps", name))


@dataclass(frozen=True)
class SweepDir:
    url: str

    space = property(lambda self: join(self.url, "sweep.json"))
    study_db = property(lambda self: join(self.url, "study.db"))
    curves = property(lambda self: join(self.url, "curves.png"))
    summary = property(lambda self: join(self.url, "summary.json"))  # common/sweep_summary.py
    tensorboard = property(lambda self: join(self.url, "tensorboard"))  # a folder per trial

    def lease(self, role: str) -> str:
        return join(self.url, "leases", f"{role}.json")

    def tracker(self, kind: str) -> str:
        """The sweep's tracker mirror's record: which tracker run is the trials' parent."""
        return join(self.url, "trackers", f"{kind}.json")


@dataclass(frozen=True)
class RunDir:
    url: str

    # files at the top of the run directory, by who writes them (see the module docstring)
    config = property(lambda self: join(self.url, "config.json"))
    metrics = property(lambda self: join(self.url, "metrics.jsonl"))
    telemetry = property(lambda self: join(self.url, "telemetry.jsonl"))
    samples = property(lambda self: join(self.url, "samples.jsonl"))
    result = property(lambda self: join(self.url, "result.json"))
    attempts = property(lambda self: join(self.url, "attempts.jsonl"))
    events = property(lambda self: join(self.url, "events.jsonl"))
    rollbacks = property(lambda self: join(self.url, "rollbacks.jsonl"))
    submissions = property(lambda self: join(self.url, "submissions.jsonl"))
    cordon = property(lambda self: join(self.url, "cordon.jsonl"))
    evaluations = property(lambda self: join(self.url, "evaluations.jsonl"))
    stragglers = property(lambda self: join(self.url, "stragglers.jsonl"))
    tensorboard = property(lambda self: join(self.url, "tensorboard"))
    job = property(lambda self: join(self.url, "job.json"))
    curves = property(lambda self: join(self.url, "curves.png"))
    hold = property(lambda self: join(self.url, "hold.json"))
    logs = property(lambda self: join(self.url, "logs"))
    checkpoints = property(lambda self: join(self.url, "checkpoints"))

    # what the project writes at the top of a run directory (the files above, and these folders)
    NAMES = frozenset(
        "config.json metrics.jsonl telemetry.jsonl samples.jsonl result.json attempts.jsonl events.jsonl "
        "rollbacks.jsonl rolled-back submissions.jsonl cordon.jsonl evaluations.jsonl stragglers.jsonl "
        "trackers tensorboard job.json curves.png hold.json faults logs leases heartbeats nccl-traces profiles "
        "checkpoints exports".split()
    )

    @staticmethod
    def is_ours(name: str) -> bool:
        """Whether a name at the top of a run directory is one the project writes there."""
        return name in RunDir.NAMES or name.startswith(".preflight-")

    def checkpoint(self, step: int) -> str:
        return join(self.checkpoints, f"step_{step:06d}")

    def rolled_back(self, number: int) -> str:
        """Where rollback `number` sets aside the checkpoints written after the one it resumes from."""
        return join(self.url, "rolled-back", f"{number:03d}")

    heartbeats = property(lambda self: join(self.url, "heartbeats"))

    def heartbeat(self, rank: int) -> str:
        """Rank `rank`'s last word (common/heartbeat.py)."""
        return join(self.heartbeats, f"rank-{rank:05d}.json")

    def nccl_traces(self, job: str) -> str:
        """Where the ranks of `job` (a Slurm job and restart, or a torchrun run id) dump NCCL's flight recorder."""
        return join(self.url, "nccl-traces", job)

    def profile(self, start: int, stop: int, rank: int) -> str:
        """Rank `rank`'s torch.profiler trace of steps start..stop-1 (training/profiling.py)."""
        return join(self.url, "profiles", f"steps_{start}-{stop}", f"rank-{rank:05d}.json")

    def fault_marker(self, name: str) -> str:
        """A fault injected on purpose that has happened (training/faults.py): it happens once per run."""
        return join(self.url, "faults", f"{name}.json")

    def tracker(self, kind: str) -> str:
        """The record of the `kind` tracker's run of this run directory (tracking/mirror.py)."""
        return join(self.url, "trackers", f"{kind}.json")

    def lease(self, role: str) -> str:
        """The lease of the run's one writer of `role` ("trainer", "flow"): common/lease.py."""
        return join(self.url, "leases", f"{role}.json")

    def export(self, step: int) -> str:
        return join(self.url, "exports", f"step_{step:06d}-hf")

    def submission_log(self, number: int) -> str:
        return join(self.logs, f"submission-{number:03d}.log")

    @staticmethod
    def step_of(name: str) -> int | None:
        """The step of a checkpoint directory's name (`step_000500` -> 500), None for anything else."""
        m = _STEP_DIR.match(name)
        return int(m.group(1)) if m else None

    @classmethod
    def of_checkpoint(cls, checkpoint_url: str) -> RunDir | None:
        """The run directory holding {run}/checkpoints/step_NNNNNN; None for a checkpoint kept anywhere else (a
        copy in a folder of its own), which has no run directory to write beside."""
        url = checkpoint_url.rstrip("/")
        parent = posixpath.dirname(url)
        if (
            cls.step_of(posixpath.basename(url)) is None
            or posixpath.basename(parent) != "checkpoints"
        ):
            return None
        return cls(posixpath.dirname(parent))

    @property
    def store(self) -> StoreLayout | None:
        """The store of a run directory laid out as {store}/runs/{run}; None for a run directory elsewhere."""
        runs = posixpath.dirname(self.url.rstrip("/"))
        return StoreLayout(posixpath.dirname(runs)) if posixpath.basename(runs) == "runs" else None


def hf_export(checkpoint_url: str, step: int) -> str:
    """Where evaluation puts a checkpoint's Hugging Face export: its run directory's exports/, or, for a
    checkpoint outside a run directory, its own eval/ folder (never a folder nobody named)."""
    run = RunDir.of_checkpoint(checkpoint_url)
    return run.export(step) if run is not None else join(checkpoint_url, "eval", "hf-export")


def eval_result(checkpoint_url: str, family: str) -> str:
    """A checkpoint's cached evaluation: family "hellaswag" (ours) or "lm_eval"."""
    return join(checkpoint_url, "eval", f"{family}.json")
