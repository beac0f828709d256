"""How a JobSpec becomes a Slurm job: the one submitit executor builder behind every job this project submits
(training, evaluation, the data-prep job array), so each of them honours every field of the spec."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import submitit

from cluster.spec import JobSpec


class _Executor(submitit.SlurmExecutor):
    """submitit's, less its refusal to be made where srun is not on PATH: the job script can be written and
    read anywhere, and every submission first checks the Slurm client itself (require_slurm_client), in one
    line that names what is missing."""

    @classmethod
    def affinity(cls) -> int:
        return 2


def build_executor(
    spec: JobSpec, *, sbatch: dict[str, Any] | None = None, **params: Any
) -> submitit.SlurmExecutor:
    """A submitit executor for `spec`. `params` add or replace submitit parameters (job_name, cpus_per_task,
    array_parallelism, ...); `sbatch` adds raw sbatch options (e.g. a dependency) to the spec's sbatch_extra."""
    Path(spec.folder).mkdir(parents=True, exist_ok=True)
    srun_args, python = _container(spec)
    ex = _Executor(folder=spec.folder, max_num_timeout=spec.max_timeout_requeues, python=python)
    opts: dict[str, Any] = dict(
        nodes=spec.nodes,
        ntasks_per_node=1,
        time=spec.time_min,
        job_name=spec.job_name,
        signal_delay_s=spec.signal_delay_s,
        srun_args=srun_args,
        setup=list(spec.setup),
    )
    if spec.gpus_per_node and spec.gres:
        opts["gpus_per_node"] = spec.gpus_per_node
    if spec.cpus_per_task:
        opts["cpus_per_task"] = spec.cpus_per_task
    if spec.mem_gb:
        opts["mem"] = f"{spec.mem_gb}GB"
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(spec, key):
            opts[key] = getattr(spec, key)
    if spec.exclusive:
        opts["exclusive"] = True
    extra: dict[str, Any] = {}
    for line in spec.sbatch_extra:
        key, _, value = line[2:].partition("=")
        extra[key.replace("-", "_")] = value if value else True
    extra.update(sbatch or {})
    if extra:
        opts["additional_parameters"] = extra
    ex.update_parameters(**{**opts, **params})
    return ex


def _container(spec: JobSpec) -> tuple[list[str], str | None]:
    """srun's arguments for the spec's container (pyxis), or the python that runs inside it (apptainer)."""
    # one node's task failing ends the step instead of leaving its peers hung
    srun_args = ["--kill-on-bad-exit=1"]
    c = spec.container
    if c is None:
        return srun_args, None
    if c.runtime == "pyxis":
        srun_args.append(f"--container-image={c.image}")
        if c.mounts:
            srun_args.append(f"--container-mounts={','.join(c.mounts)}")
        if c.workdir:
            srun_args.append(f"--container-workdir={c.workdir}")
        return srun_args, c.python
    binds = [a for m in c.mounts for a in ("--bind", m)]
    gpu = ["--nv"] if spec.gpus_per_node else []
    return srun_args, shlex.join(["apptainer", "exec", *gpu, *binds, c.image, c.python])
