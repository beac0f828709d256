"""Submit-time checks: everything that would make a queued job fail after waiting for nodes, raised before sbatch."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from cluster.spec import JobSpec
from common.errors import BadInput
from common.shards import ShardError, list_shards
from training.config import ConfigError, RunConfig, load_config


class SpecError(BadInput, ValueError):
    """The job cannot run as specified; the message lists every problem found."""


@dataclass(frozen=True)
class NodeInfo:
    name: str
    partitions: tuple[str, ...]
    cpus: int
    gpus: int
    mem_mb: int


SLURM_COMMANDS = ("sbatch", "squeue", "sacct", "scancel", "sinfo")


def require_slurm_client() -> None:
    """Submitting and watching jobs needs Slurm's commands on PATH: say so before anything else fails."""
    missing = [c for c in SLURM_COMMANDS if shutil.which(c) is None]
    if missing:
        raise SpecError(f"no Slurm client on this machine ({', '.join(missing)} not on PATH): install it "
                        "(Debian: slurm-client) with this cluster's slurm.conf and munge key, or run where it is")


def cluster_nodes() -> tuple[list[NodeInfo], str | None]:
    """The nodes sinfo reports and the default partition. No Slurm client, or a controller that does not
    answer, is a SpecError: sbatch would fail the same way, less clearly."""
    require_slurm_client()
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N|%P|%c|%G|%m"], capture_output=True, text=True,
                             timeout=30)
    except subprocess.TimeoutExpired:
        raise SpecError("the Slurm controller did not answer sinfo within 30 s") from None
    if out.returncode != 0:
        first = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[0]
        raise SpecError(f"the Slurm controller does not answer (sinfo: {first})")
    by_name: dict[str, NodeInfo] = {}
    default = None
    for line in out.stdout.splitlines():
        name, part, cpus, gres, mem = line.strip().split("|")
        if part.endswith("*"):
            part = default = part[:-1]
        # gres looks like "gpu:8", "gpu:h100:8(S:0-1)" or "(null)"
        gpus = sum(int(m.group(1)) for m in re.finditer(r"gpu:(?:[^:,(]+:)?(\d+)", gres))
        old = by_name.get(name)
        parts = (old.partitions if old else ()) + (part,)
        by_name[name] = NodeInfo(name, parts, int(cpus.rstrip("+")), gpus, int(re.sub(r"\D", "", mem) or 0))
    return list(by_name.values()), default


def check_capacity(spec: JobSpec, nodes: list[NodeInfo], default_partition: str | None) -> list[str]:
    part = spec.partition or default_partition
    if part is None:
        return ["no partition given and the cluster has no default partition"]
    members = [n for n in nodes if part in n.partitions]
    if not members:
        return [f"partition {part!r} does not exist (known: {sorted({p for n in nodes for p in n.partitions})})"]
    problems = []
    if spec.nodes > len(members):
        problems.append(f"{spec.nodes} nodes requested but partition {part!r} has {len(members)}")
    fit = [n for n in members if n.gpus >= spec.gpus_per_node and n.cpus >= (spec.cpus_per_task or 1)
           and n.mem_mb >= (spec.mem_gb or 0) * 1024]
    if spec.gpus_per_node and not any(n.gpus >= spec.gpus_per_node for n in members):
        problems.append(f"gpus_per_node={spec.gpus_per_node} but nodes of {part!r} have at most "
                        f"{max(n.gpus for n in members)} GPUs")
    elif len(fit) < spec.nodes:
        problems.append(f"only {len(fit)} nodes of {part!r} have {spec.gpus_per_node} GPUs, "
                        f"{spec.cpus_per_task or 1} CPUs and {spec.mem_gb or 0} GB; {spec.nodes} requested")
    return problems


def validate(spec: JobSpec, config: str, overrides: list[str] | None = None, *, check_cluster: bool = True,
             check_data: bool = True) -> RunConfig:
    """The resolved run config, or SpecError naming every reason the job could not start."""
    problems: list[str] = []
    try:
        cfg = load_config(config, overrides or [])
    except ConfigError as err:
        raise SpecError(f"invalid run config: {err}") from err
    for check in (cfg.grad_accum_steps, cfg.val_steps_per_rank):
        try:
            check(spec.world_size)
        except ConfigError as err:
            problems.append(f"world size {spec.world_size} ({spec.nodes} nodes x {spec.procs_per_node}): {err}")
    if check_data:
        try:
            list_shards(cfg.data.data_url, "train")
        except (ShardError, OSError) as err:
            problems.append(f"data URL {cfg.data.data_url!r} is not readable: {err}")
    if check_cluster:
        problems += check_capacity(spec, *cluster_nodes())
    if problems:
        raise SpecError("job spec rejected before sbatch:\n  - " + "\n  - ".join(problems))
    return cfg
