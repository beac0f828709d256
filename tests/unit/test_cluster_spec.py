"""The job spec as the sbatch script submitit writes (no cluster needed) and the capacity and GPU-memory checks
against sinfo's view."""

import pytest
from pydantic import ValidationError

from cluster.sbatch import build_executor
from cluster.spec import Container, JobSpec
from cluster.validate import (
    NodeInfo,
    check_capacity,
    check_gpu_memory,
    gpu_type_memory_gb,
    parse_sinfo,
    partition_gpu_memory_gb,
)
from training.config import load_config


def sbatch_text(spec: JobSpec) -> str:
    ex = build_executor(spec)
    return ex._make_submission_file_text(ex._submitit_command_str, "uid")


def test_gpu_spec_becomes_sbatch_lines(tmp_path):
    text = sbatch_text(
        JobSpec(
            nodes=4,
            gpus_per_node=8,
            cpus_per_task=64,
            mem_gb=900,
            partition="gpu",
            account="proj",
            qos="high",
            time_min=240,
            constraint="h100",
            exclusive=True,
            sbatch_extra=["--reservation=big", "--requeue"],
            setup=["module load cuda"],
            folder=str(tmp_path),
        )
    )
    for line in [
        "--nodes=4",
        "--ntasks-per-node=1",
        "--gpus-per-node=8",
        "--cpus-per-task=64",
        "--mem=900GB",
        "--partition=gpu",
        "--account=proj",
        "--qos=high",
        "--time=240",
        "--constraint=h100",
        "--exclusive",
        "--reservation=big",
        "--requeue",
        "--signal=USR2@90",
    ]:
        assert f"#SBATCH {line}\n" in text, line
    assert "module load cuda" in text and "--kill-on-bad-exit=1" in text


def test_cpu_spec_requests_no_gres(tmp_path):
    assert "gpus" not in sbatch_text(JobSpec(nodes=2, folder=str(tmp_path)))
    assert "gpus" not in sbatch_text(
        JobSpec(nodes=2, gpus_per_node=8, gres=False, folder=str(tmp_path))
    )


def test_a_job_script_is_written_where_slurm_is_not_and_a_submission_there_is_refused_in_one_line(
    tmp_path, monkeypatch
):
    from cluster.validate import SpecError, require_slurm_client

    monkeypatch.setenv("PATH", str(tmp_path))  # no srun, no sbatch: a laptop, or a CI machine
    assert "#SBATCH --nodes=2\n" in sbatch_text(JobSpec(nodes=2, folder=str(tmp_path)))
    with pytest.raises(SpecError, match=r"no Slurm client on this machine \(sbatch, srun, squeue"):
        require_slurm_client()


def test_containers(tmp_path):
    pyxis = sbatch_text(
        JobSpec(
            folder=str(tmp_path),
            container=Container(
                image="nvcr.io#nvidia/pytorch:24.05-py3",
                mounts=["/shared:/shared", "/repo:/repo"],
                workdir="/repo",
            ),
        )
    )
    assert "--container-image=nvcr.io#nvidia/pytorch:24.05-py3" in pyxis
    assert (
        "--container-mounts=/shared:/shared,/repo:/repo" in pyxis
        and "--container-workdir=/repo" in pyxis
    )
    apptainer = sbatch_text(
        JobSpec(
            folder=str(tmp_path),
            gpus_per_node=1,
            container=Container(image="/img/train.sif", runtime="apptainer", mounts=["/shared"]),
        )
    )
    assert (
        "apptainer exec --nv --bind /shared /img/train.sif python -u -m submitit.core._submit"
        in apptainer
    )


def test_spec_rejects_unknown_fields_and_bad_values():
    with pytest.raises(ValueError, match="gpu_per_node"):
        JobSpec(gpu_per_node=8)
    with pytest.raises(ValueError, match="long options"):
        JobSpec(sbatch_extra=["reservation=x"])
    with pytest.raises(ValueError, match="signal_delay_s"):
        JobSpec(time_min=1, signal_delay_s=90)


def test_capacity_against_the_nodes_sinfo_reports():
    nodes = [NodeInfo(f"g{i}", ("gpu",), 64, 8, 1_000_000) for i in range(4)] + [
        NodeInfo("c1", ("cpu",), 8, 0, 64_000)
    ]
    assert check_capacity(JobSpec(nodes=4, gpus_per_node=8), nodes, "gpu") == []
    assert "at most 8 GPUs" in check_capacity(JobSpec(nodes=1, gpus_per_node=16), nodes, "gpu")[0]
    assert "has 4" in check_capacity(JobSpec(nodes=5, gpus_per_node=8), nodes, "gpu")[0]
    assert (
        "0 GPUs, 1 CPUs and 128 GB"
        in check_capacity(JobSpec(partition="cpu", mem_gb=128), nodes, "gpu")[0]
    )


SINFO = """\
g1|gpu*|64|gpu:h100:8(S:0-1)|1000000
g2|gpu*|64|gpu:nvidia_h100_80gb_hbm3:8(S:0-1)|1000000
g2|long|64|gpu:nvidia_h100_80gb_hbm3:8(S:0-1)|1000000
a1|a100|32|gpu:a100:4|500000
x1|mixed|32|gpu:8|500000
x2|mixed|32|gpu:h200:8|500000
c1|cpu|8|(null)|64000
"""


def test_sinfo_lines_become_nodes_with_their_gpu_types():
    nodes, default = parse_sinfo(SINFO)
    by = {n.name: n for n in nodes}
    assert default == "gpu" and by["g2"].partitions == ("gpu", "long")
    assert (by["g1"].gpus, by["g1"].gpu_types) == (8, ("h100",))
    assert by["x1"].gpu_types == ("",) and by["c1"].gpus == 0 and by["c1"].gpu_types == ()


@pytest.mark.parametrize(
    "name, gb",
    [
        ("h100", 80),
        ("nvidia_h100_80gb_hbm3", 80),
        ("h100_nvl", 94),
        ("h200", 141),
        ("a100", 80),
        ("a100-sxm4-40gb", 40),
        ("nvidia_a100_3g.39gb", 39),
        ("a10g", 24),
        ("l40s", 48),
        ("rtx_a6000", 48),
        ("tesla_v100-sxm2-16gb", 16),
        ("gh200", None),
        ("tesla", None),
        ("", None),
    ],
)
def test_gpu_memory_from_the_gres_type_name(name, gb):
    assert gpu_type_memory_gb(name) == gb


def test_partition_gpu_memory_is_known_only_when_every_gpu_type_is():
    nodes, default = parse_sinfo(SINFO)
    assert partition_gpu_memory_gb(JobSpec(gpus_per_node=8), nodes, default) == 80
    assert partition_gpu_memory_gb(JobSpec(gpus_per_node=4, partition="a100"), nodes, default) == 80
    assert (
        partition_gpu_memory_gb(JobSpec(gpus_per_node=8, partition="mixed"), nodes, default) is None
    )  # x1: gpu:8
    assert (
        partition_gpu_memory_gb(JobSpec(gpus_per_node=8, partition="a100"), nodes, default) is None
    )  # no node fits


def test_a_run_too_large_for_the_partitions_gpus_is_refused_with_the_micro_batch_that_fits():
    nodes, default = parse_sinfo(SINFO)
    spec = JobSpec(nodes=2, gpus_per_node=8)
    mem = partition_gpu_memory_gb(spec, nodes, default)
    (line,) = check_gpu_memory(
        load_config("gpt2-1558m", ["micro_batch=16"]), spec, mem, "the GPUs of partition gpu"
    )
    assert line.startswith("gpt2-1558m at micro_batch=16, seq_len=1024 needs ~90 GB per GPU (")
    assert line.endswith(
        "but the GPUs of partition gpu have 80 GB: micro_batch=8 fits (set train.micro_batch=8; "
        "gradient accumulation keeps the global batch)"
    )
    assert check_gpu_memory(load_config("gpt2-1558m"), spec, mem, "the GPUs of partition gpu") == []


def test_a_run_whose_checkpoints_outlast_signal_delay_is_warned_at_submit(tmp_path, caplog):
    """The run's own history (metrics.jsonl) says how long its checkpoints take to write; a stop on USR2 must
    fit the step in flight and that write into signal_delay_s less the launcher's 10 s."""
    import json
    import logging

    from cluster.spec import JobSpec
    from cluster.validate import validate

    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": i, "loss": 5.0, "step_ms": 500.0} for i in range(10)]
    lines[4]["ckpt_write_s"] = 95.0
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    spec = JobSpec(time_min=60, signal_delay_s=90)
    with caplog.at_level(logging.WARNING, logger="cluster.validate"):
        validate(spec, "tiny", [f"run_dir={run}"], check_cluster=False, check_data=False)
    # asynchronous writes (the default): the stop may wait for a periodic write just begun, then its own
    assert (
        "signal_delay_s=90 leaves 80 s to stop with a checkpoint, but this run's checkpoints took up to 95 s"
        " to write"
        in caplog.text
        and "a stop may wait for two (a periodic write in flight, then its own" in caplog.text
        and "set signal_delay_s to at least 220" in caplog.text
    )
    caplog.clear()
    sync = [f"run_dir={run}", "checkpoint.async_write=false"]
    with caplog.at_level(logging.WARNING, logger="cluster.validate"):
        validate(spec, "tiny", sync, check_cluster=False, check_data=False)
    assert (
        "took up to 95 s" in caplog.text
        and "two" not in caplog.text
        and "set signal_delay_s to at least 125" in caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cluster.validate"):
        validate(
            spec.model_copy(update={"signal_delay_s": 210}),
            "tiny",
            [f"run_dir={run}"],
            check_cluster=False,
            check_data=False,
        )
        validate(
            spec.model_copy(update={"signal_delay_s": 110}),
            "tiny",
            sync,
            check_cluster=False,
            check_data=False,
        )
        validate(
            spec, "tiny", [f"run_dir={tmp_path / 'new'}"], check_cluster=False, check_data=False
        )
    assert "signal_delay_s" not in caplog.text  # room enough; a new run has nothing measured


def test_before_any_checkpoint_is_measured_its_write_time_is_estimated_from_the_model_and_the_store():
    """12 bytes per parameter (fp32 weights, AdamW's two moments) at a conservative bandwidth per kind of store;
    the measured writes replace the estimate once there are any (the test above)."""
    from cluster.validate import checkpoint_bytes, checkpoint_time_warning

    spec = JobSpec(time_min=60, signal_delay_s=90)
    small = load_config("gpt2-124m", ["run_dir=s3://bucket/runs/new"])
    assert (
        checkpoint_bytes(small) == 1_493_710_848
    )  # the 1494 MB the 124M's checkpoints measure (bench/results/)
    assert checkpoint_time_warning(small, spec) is None  # ~30 s at 50 MB/s: room enough
    large = load_config("gpt2-1558m", ["run_dir=s3://bucket/runs/new"])
    assert checkpoint_time_warning(large, spec) == (
        "signal_delay_s=90 leaves 80 s to stop with a checkpoint, but a checkpoint of gpt2-1558m (18.7 GB: weights "
        "and AdamW state) is estimated to take ~374 s to write to an object store at a conservative 50 MB/s (an "
        "estimate: no checkpoint of this run measured yet) and a stop may wait for two (a periodic write in flight, "
        "then its own: checkpoint.async_write): a preempted or timed-out job may be killed before its checkpoint is "
        "complete; set signal_delay_s to at least 777 (once a checkpoint is written, its measured time counts "
        "instead)"
    )
    local = checkpoint_time_warning(
        load_config("gpt2-774m", ["run_dir=/nonexistent/runs/new"]), spec
    )
    assert (
        "(9.3 GB: weights and AdamW state) is estimated to take ~93 s to write to a filesystem at a "
        "conservative 100 MB/s (an estimate" in local
    )
    assert checkpoint_time_warning(large, spec.model_copy(update={"signal_delay_s": 760})) is None
    synchronous = load_config(
        "gpt2-1558m", ["run_dir=s3://bucket/runs/new", "checkpoint.async_write=false"]
    )
    assert "set signal_delay_s to at least 403 " in checkpoint_time_warning(synchronous, spec)
    assert (
        checkpoint_time_warning(synchronous, spec.model_copy(update={"signal_delay_s": 410}))
        is None
    )


def _string_fields(model, prefix=""):
    """Every field of a spec that holds text (lists of text and the container's included), by dotted path."""
    import typing

    from pydantic import BaseModel

    out = []
    for name, field in model.model_fields.items():
        text = str(field.annotation)
        models = [a for a in typing.get_args(field.annotation) if isinstance(a, type)]
        sub = next((a for a in models if issubclass(a, BaseModel)), None)
        if sub is not None:
            out += _string_fields(sub, f"{prefix}{name}.")
        elif "str" in text:
            out.append((prefix + name, "list" in text))
    return out


def _spec_with(path, value):
    from cluster.spec import JobSpec

    base = {"container": {"image": "img"}}
    head, _, leaf = path.rpartition(".")
    target = base["container"] if head == "container" else base
    target[leaf] = value
    return JobSpec.model_validate(base)


@pytest.mark.parametrize(
    "injection", ["x\n#SBATCH --time=1", "x\rnohup evil &", "x\x00y", "--x=1\necho pwned"]
)
def test_no_value_of_a_job_spec_can_add_a_line_to_the_job_script(injection):
    """Each text field of JobSpec (and of its container), given a line break: refused, so no value can add a
    command or a directive (which would silently disable every #SBATCH line after it)."""
    fields = _string_fields(JobSpec)
    names = {f for f, _ in fields}
    assert {"job_name", "account", "partition", "sbatch_extra", "setup", "container.image"} <= names
    for path, is_list in fields:
        with pytest.raises(ValidationError):
            _spec_with(path, [injection] if is_list else injection)


def test_the_job_script_of_a_full_spec_has_its_directives_then_its_commands(tmp_path):
    """Every field set to a value with spaces and punctuation where Slurm allows them: the script sbatch reads
    has exactly one line per directive and per setup line, every #SBATCH line before the first command."""
    spec = JobSpec(
        nodes=2,
        gpus_per_node=8,
        cpus_per_task=16,
        mem_gb=200,
        partition="gpu",
        account="proj-1",
        qos="high",
        constraint="h100&ib",
        job_name="run.1",
        time_min=240,
        folder=str(tmp_path),
        sbatch_extra=["--comment=a run; with words", "--exclude=n[1-3]"],
        setup=["module load cuda/12"],
        container=Container(image="nvcr.io#nvidia/pytorch:24.05-py3", mounts=["/shared:/shared"]),
    )
    text = build_executor(spec)._make_submission_file_text("python -m x", "uid")
    lines = text.splitlines()
    directives = [i for i, ln in enumerate(lines) if ln.startswith("#SBATCH")]
    first_command = next(i for i, ln in enumerate(lines) if ln.strip() and not ln.startswith("#"))
    assert directives and max(directives) < first_command
    # submitit quotes each value: the shell never reads one as words
    assert "#SBATCH --comment='a run; with words'" in lines and "module load cuda/12" in lines
