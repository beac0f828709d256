"""The Slurm job spec: what to ask Slurm for (training, evaluation and data-prep jobs), typed and checked field
by field. cluster/sbatch.py turns it into the job; the CLIs derive their flags from it."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Every value of a spec ends up in the job script that sbatch reads: a line break would add a line (a command,
# or a directive that silently disables every #SBATCH line after it), so none is ever accepted. Names that
# Slurm takes as one word (partition, account, qos, job name) are words; an sbatch option is one option.
SLURM_WORD = r"^[A-Za-z0-9_.:+,@%/=-]+$"
SBATCH_OPTION = r"^--[A-Za-z][A-Za-z0-9-]*(=[^\x00-\x1f\x7f]+)?$"


def no_control_characters(value: object, where: str = "") -> None:
    """ValueError when a string anywhere in `value` (lists and nested models included) holds a line break or
    another control character."""
    if isinstance(value, str):
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError(
                f"{where or 'a value'} holds a line break or control character: {value!r}"
            )
    elif isinstance(value, (list, tuple)):
        for v in value:
            no_control_characters(v, where)
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            no_control_characters(getattr(value, name), f"{where}.{name}" if where else name)


class Container(BaseModel):
    """Where the job's Python runs: a pyxis/enroot image (srun --container-image) or an apptainer image."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    image: str = Field(
        description="pyxis: an enroot image (e.g. 'nvcr.io#nvidia/pytorch:24.05-py3' or a .sqsh); "
        "apptainer: a .sif path"
    )
    runtime: Literal["pyxis", "apptainer"] = "pyxis"
    mounts: list[str] = Field(
        default_factory=list, description="SRC:DST[:ro] bind mounts (the repo, the shared folder)"
    )
    python: str = Field("python", description="the interpreter inside the container")
    workdir: str | None = Field(None, description="pyxis --container-workdir")


class JobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0, description="0 = CPU nodes: one gloo process per node")
    cpus_per_task: int | None = Field(
        None, ge=1, description="CPUs of the one task per node (all its ranks)"
    )
    mem_gb: int | None = Field(None, ge=1, description="memory per node")
    partition: str | None = Field(None, pattern=SLURM_WORD)
    account: str | None = Field(None, pattern=SLURM_WORD)
    qos: str | None = Field(None, pattern=SLURM_WORD)
    time_min: int = Field(
        60, ge=1, description="time limit of one attempt (each requeue gets it again)"
    )
    constraint: str | None = None
    exclusive: bool = False
    job_name: str = Field("gpt2-train", pattern=SLURM_WORD)
    sbatch_extra: list[str] = Field(
        default_factory=list,
        description="extra sbatch options, e.g. '--reservation=big' or '--exclude=n3'",
    )
    setup: list[str] = Field(
        default_factory=list,
        description="shell lines run before the tasks (module load, source a venv)",
    )
    container: Container | None = None
    folder: str = Field(
        "slurm_logs", description="submitit's folder (pickles, logs): a path every node can read"
    )
    max_timeout_requeues: int = Field(3, ge=0, description="requeues after hitting the time limit")
    max_preemption_requeues: int = Field(10, ge=0, description="requeues after preemption")
    signal_delay_s: int = Field(
        90, ge=10, description="Slurm sends USR2 this long before the time limit"
    )
    gres: bool = Field(
        True, description="request --gpus-per-node (turn off on clusters without GPU GRES)"
    )
    gpu_mem_gb: float | None = Field(
        None,
        gt=0,
        description="memory of one GPU in GB, for the check that the run "
        "fits before sbatch (default: from the GPU type in the nodes' Gres, e.g. "
        "gpu:h100:8 -> 80; no check when neither is known)",
    )

    @field_validator("sbatch_extra")
    @classmethod
    def _one_option_each(cls, lines: list[str]) -> list[str]:
        for line in lines:
            if not re.fullmatch(SBATCH_OPTION, line):
                raise ValueError(
                    f"sbatch_extra entries are long options, one each, like '--reservation=x', got {line!r}"
                )
        return lines

    @model_validator(mode="after")
    def _check(self) -> JobSpec:
        no_control_characters(self)
        if self.signal_delay_s >= self.time_min * 60:
            raise ValueError(
                f"signal_delay_s={self.signal_delay_s} is not shorter than time_min={self.time_min} min"
            )
        return self

    @property
    def procs_per_node(self) -> int:
        return max(1, self.gpus_per_node)

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


def with_excluded(spec: JobSpec, hosts: tuple[str, ...]) -> JobSpec:
    """The spec with `hosts` added to its sbatch --exclude (merged with one the spec already has)."""
    if not hosts:
        return spec
    extra, excluded = [], list(hosts)
    for line in spec.sbatch_extra:
        if line.startswith("--exclude="):
            excluded = [*line.removeprefix("--exclude=").split(","), *excluded]
        else:
            extra.append(line)
    return spec.model_copy(
        update={"sbatch_extra": [*extra, f"--exclude={','.join(dict.fromkeys(excluded))}"]}
    )
