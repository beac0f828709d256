"""Submit-time checks: everything that would make a queued job fail after waiting for nodes, raised before sbatch."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from dataclasses import dataclass

from cluster.spec import JobSpec
from common.errors import BadInput
from common.shards import ShardError, list_shards
from training.config import ConfigError, RunConfig, load_config
from training.memory import GB, estimate, fitting_micro_batch, gb

log = logging.getLogger(__name__)


class SpecError(BadInput, ValueError):
    """The job cannot run as specified; the message lists every problem found."""


@dataclass(frozen=True)
class NodeInfo:
    name: str
    partitions: tuple[str, ...]
    cpus: int
    gpus: int
    mem_mb: int
    gpu_types: tuple[
        str, ...
    ] = ()  # the type names of its Gres ("h100" of gpu:h100:8), when it has them


SLURM_COMMANDS = ("sbatch", "srun", "squeue", "sacct", "scancel", "sinfo")


def require_slurm_client() -> None:
    """Submitting and watching jobs needs Slurm's commands on PATH: say so before anything else fails."""
    missing = [c for c in SLURM_COMMANDS if shutil.which(c) is None]
    if missing:
        raise SpecError(
            f"no Slurm client on this machine ({', '.join(missing)} not on PATH): install it "
            "(Debian: slurm-client) with this cluster's slurm.conf and munge key, or run where it is"
        )


def cluster_nodes() -> tuple[list[NodeInfo], str | None]:
    """The nodes sinfo reports and the default partition. No Slurm client, or a controller that does not
    answer, is a SpecError: sbatch would fail the same way, less clearly."""
    require_slurm_client()
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N|%P|%c|%G|%m"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        raise SpecError("the Slurm controller did not answer sinfo within 30 s") from None
    if out.returncode != 0:
        first = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[0]
        raise SpecError(f"the Slurm controller does not answer (sinfo: {first})")
    return parse_sinfo(out.stdout)


def parse_sinfo(text: str) -> tuple[list[NodeInfo], str | None]:
    """The nodes and the default partition from `sinfo -h -N -o "%N|%P|%c|%G|%m"` output (a node in several
    partitions has one line per partition)."""
    by_name: dict[str, NodeInfo] = {}
    default = None
    for line in text.splitlines():
        name, part, cpus, gres, mem = line.strip().split("|")
        if part.endswith("*"):
            part = default = part[:-1]
        # gres looks like "gpu:8", "gpu:h100:8(S:0-1)" or "(null)"
        found = [
            (m.group(1), int(m.group(2))) for m in re.finditer(r"gpu:(?:([^:,(]+):)?(\d+)", gres)
        ]
        old = by_name.get(name)
        parts = (old.partitions if old else ()) + (part,)
        by_name[name] = NodeInfo(
            name,
            parts,
            int(cpus.rstrip("+")),
            sum(n for _, n in found),
            int(re.sub(r"\D", "", mem) or 0),
            tuple(t.lower() if t else "" for t, _ in found),
        )
    return list(by_name.values()), default


def check_capacity(
    spec: JobSpec, nodes: list[NodeInfo], default_partition: str | None
) -> list[str]:
    part = spec.partition or default_partition
    if part is None:
        return ["no partition given and the cluster has no default partition"]
    members = [n for n in nodes if part in n.partitions]
    if not members:
        return [
            f"partition {part!r} does not exist (known: {sorted({p for n in nodes for p in n.partitions})})"
        ]
    problems = []
    if spec.nodes > len(members):
        problems.append(f"{spec.nodes} nodes requested but partition {part!r} has {len(members)}")
    fit = [
        n
        for n in members
        if n.gpus >= spec.gpus_per_node
        and n.cpus >= (spec.cpus_per_task or 1)
        and n.mem_mb >= (spec.mem_gb or 0) * 1024
    ]
    if spec.gpus_per_node and not any(n.gpus >= spec.gpus_per_node for n in members):
        problems.append(
            f"gpus_per_node={spec.gpus_per_node} but nodes of {part!r} have at most "
            f"{max(n.gpus for n in members)} GPUs"
        )
    elif len(fit) < spec.nodes:
        problems.append(
            f"only {len(fit)} nodes of {part!r} have {spec.gpus_per_node} GPUs, "
            f"{spec.cpus_per_task or 1} CPUs and {spec.mem_gb or 0} GB; {spec.nodes} requested"
        )
    return problems


# GB of memory of one GPU (as sold) by the type name a cluster gives its Gres. A name that states its size
# (nvidia_h100_80gb_hbm3, a100-sxm4-40gb) is read instead. A bare name means the usual data-centre part, the
# larger one where two sizes are common (a100: 80, v100: 32): the check may then miss a job too large for the
# smaller card, never refuse one that fits (a 40 GB A100 partition needs gpu_mem_gb=40).
GPU_MEMORY_GB = {
    "b200": 180,
    "h200": 141,
    "h100": 80,
    "h100nvl": 94,
    "h800": 80,
    "a100": 80,
    "a800": 80,
    "a40": 48,
    "a6000": 48,
    "l40": 48,
    "l40s": 48,
    "a30": 24,
    "a10": 24,
    "a10g": 24,
    "l4": 24,
    "v100": 32,
    "t4": 16,
    "mi300x": 192,
}


def gpu_type_memory_gb(gpu_type: str) -> float | None:
    """GB of one GPU of a Gres type name, or None for a name this does not know (no guessing)."""
    words = [w for w in re.split(r"[_\-\s]+", gpu_type.lower()) if w]
    for w in words:
        if m := re.fullmatch(r"(?:\d+g\.)?(\d+)g(?:b|ib)?", w):  # 80gb; a MIG slice's 3g.40gb
            return float(m.group(1))
    if "h100" in words and "nvl" in words:
        return float(GPU_MEMORY_GB["h100nvl"])
    known = [GPU_MEMORY_GB[w] for w in words if w in GPU_MEMORY_GB]
    return float(known[0]) if known else None


def _gpu_nodes(
    spec: JobSpec, nodes: list[NodeInfo], default_partition: str | None
) -> list[NodeInfo]:
    """The nodes of the job's partition that have the GPUs it asks for: where it may run."""
    part = spec.partition or default_partition
    return [n for n in nodes if part in n.partitions and n.gpus >= spec.gpus_per_node]


def partition_gpu_memory_gb(
    spec: JobSpec, nodes: list[NodeInfo], default_partition: str | None
) -> float | None:
    """GB of one GPU on the nodes the job may run on (the smallest, if they differ), from their Gres types;
    None when any of them has a GPU type this does not know."""
    sizes = []
    for n in _gpu_nodes(spec, nodes, default_partition):
        known = [gpu_type_memory_gb(t) for t in n.gpu_types]
        if not known or None in known:
            return None
        sizes.append(min(g for g in known if g is not None))
    return min(sizes) if sizes else None


def check_gpu_memory(
    cfg: RunConfig, spec: JobSpec, gpu_mem_gb: float | None, where: str
) -> list[str]:
    """A run whose per-GPU memory estimate (training/memory.py) exceeds `gpu_mem_gb`, with the micro-batch that
    would fit; nothing on a CPU job or when the GPU's memory is unknown. `where` names the GPUs for the message."""
    if not spec.gpus_per_node or gpu_mem_gb is None:
        return []
    t = cfg.train
    need = estimate(cfg, world_size=spec.world_size)
    if need.total <= gpu_mem_gb * GB:
        return []
    head = (
        f"{cfg.name} at micro_batch={t.micro_batch}, seq_len={t.seq_len} needs ~{gb(need.total)} GB per GPU "
        f"({need.summary()}) but {where} have {gpu_mem_gb:g} GB"
    )
    fit = fitting_micro_batch(cfg, gpu_mem_gb * GB, world_size=spec.world_size)
    if fit is None:
        levers = (
            "" if t.loss_chunk else "train.loss_chunk=8192, "
        ) + "a shorter seq_len or GPUs with more memory"
        return [f"{head}: not even micro_batch=1 fits (try {levers})"]
    return [
        f"{head}: micro_batch={fit} fits (set train.micro_batch={fit}; gradient accumulation keeps the "
        "global batch)"
    ]


def validate(
    spec: JobSpec,
    config: str,
    overrides: list[str] | None = None,
    *,
    check_cluster: bool = True,
    check_data: bool = True,
) -> RunConfig:
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
            problems.append(
                f"world size {spec.world_size} ({spec.nodes} nodes x {spec.procs_per_node}): {err}"
            )
    if check_data:
        try:
            list_shards(cfg.data.url, "train")
        except (ShardError, OSError) as err:
            problems.append(f"data URL {cfg.data.url!r} is not readable: {err}")
    mem, where = spec.gpu_mem_gb, "the job's GPUs (gpu_mem_gb)"
    if check_cluster:
        nodes, default = cluster_nodes()
        problems += check_capacity(spec, nodes, default)
        if mem is None and spec.gpus_per_node:
            mem = partition_gpu_memory_gb(spec, nodes, default)
            types = sorted({t for n in _gpu_nodes(spec, nodes, default) for t in n.gpu_types})
            where = f"the GPUs of partition {spec.partition or default} ({', '.join(types)})"
    problems += check_gpu_memory(cfg, spec, mem, where)
    if problems:
        raise SpecError("job spec rejected before sbatch:\n  - " + "\n  - ".join(problems))
    warning = checkpoint_time_warning(cfg, spec)
    if warning:
        log.warning("%s", warning)
    return cfg


# What a checkpoint write is assumed to reach before one is measured, MB/s: rank 0 serializes, hashes and writes
# the weights and optimizer state alone (1.5 GB took 10 s, ~150 MB/s, on a 2-vCPU VM's local disk; moto's S3
# server takes ~58 MB/s). Low on purpose: the warning is for runs that cannot stop in time, not a prediction.
ESTIMATED_WRITE_MB_S = {"a filesystem": 100.0, "an object store": 50.0}


def checkpoint_bytes(cfg: RunConfig) -> int:
    """A checkpoint's size from the model's parameters: fp32 weights and AdamW's two fp32 moments, 12 bytes each
    (the per-rank loader and RNG files are small)."""
    from training.memory import num_parameters

    return 12 * num_parameters(cfg.model)


def checkpoint_time_warning(cfg: RunConfig, spec: JobSpec) -> str | None:
    """On USR2 every rank finishes its step and writes a checkpoint it waits for, within signal_delay_s less
    the launcher's 10 s: a run whose own checkpoints (metrics.jsonl `ckpt_write_s`) took longer would be
    killed at its time limit with that checkpoint unfinished, losing the steps since the one before. With
    asynchronous writes the signal can find a periodic checkpoint's write just begun, which the stop's own
    write waits for: two writes in the worst case. Before any is measured, the write time is estimated from
    the checkpoint's size at a conservative bandwidth."""
    from common import store
    from training.metrics import read_metrics

    try:
        metrics = read_metrics(cfg.train.run_dir)
    except Exception:  # a store this machine cannot read: nothing measured to go by
        metrics = []
    writes = [float(m["ckpt_write_s"]) for m in metrics if "ckpt_write_s" in m]
    steps = sorted(float(m["step_ms"]) / 1000 for m in metrics if "step_ms" in m)
    room = spec.signal_delay_s - 10
    n = 2 if cfg.checkpoint.async_write else 1
    two = (
        " and a stop may wait for two (a periodic write in flight, then its own: checkpoint.async_write)"
        if n == 2
        else ""
    )
    if writes:
        need = n * max(writes) + (
            steps[len(steps) // 2] if steps else 0.0
        )  # the step in flight, then the writes
        if need <= room:
            return None
        return (
            f"signal_delay_s={spec.signal_delay_s} leaves {room} s to stop with a checkpoint, but this run's "
            f"checkpoints took up to {max(writes):.0f} s to write ({cfg.train.run_dir}/metrics.jsonl){two}: a "
            f"preempted or timed-out job may be killed before "
            f"its checkpoint is complete; set signal_delay_s to at least {int(need) + 30}"
        )
    kind = "a filesystem" if store.is_local(cfg.train.run_dir) else "an object store"
    size = checkpoint_bytes(cfg)
    write = size / (ESTIMATED_WRITE_MB_S[kind] * 1e6)
    need = n * write  # the step in flight comes on top, unknown before a run
    if need <= room:
        return None
    return (
        f"signal_delay_s={spec.signal_delay_s} leaves {room} s to stop with a checkpoint, but a checkpoint of "
        f"{cfg.name} ({size / 1e9:.1f} GB: weights and AdamW state) is estimated to take ~{write:.0f} s to write "
        f"to {kind} at a conservative {ESTIMATED_WRITE_MB_S[kind]:.0f} MB/s (an estimate: no checkpoint of this "
        f"run measured yet){two}: a preempted or timed-out job "
        f"may be killed before its checkpoint is complete; set signal_delay_s to at least {int(need) + 30} "
        "(once a checkpoint is written, its measured time counts instead)"
    )
