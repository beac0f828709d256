"""The job spec as the sbatch script submitit writes (no cluster needed) and the capacity check against sinfo's view."""

import pytest

from cluster.spec import Container, JobSpec
from cluster.sbatch import build_executor
from cluster.validate import NodeInfo, check_capacity


def sbatch_text(spec: JobSpec) -> str:
    ex = build_executor(spec)
    return ex._make_submission_file_text(ex._submitit_command_str, "uid")


def test_gpu_spec_becomes_sbatch_lines(tmp_path):
    text = sbatch_text(JobSpec(nodes=4, gpus_per_node=8, cpus_per_task=64, mem_gb=900, partition="gpu",
                               account="proj", qos="high", time_min=240, constraint="h100", exclusive=True,
                               sbatch_extra=["--reservation=big", "--requeue"], setup=["module load cuda"],
                               folder=str(tmp_path)))
    for line in ["--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=64", "--mem=900GB",
                 "--partition=gpu", "--account=proj", "--qos=high", "--time=240", "--constraint=h100",
                 "--exclusive", "--reservation=big", "--requeue", "--signal=USR2@90"]:
        assert f"#SBATCH {line}\n" in text, line
    assert "module load cuda" in text and "--kill-on-bad-exit=1" in text


def test_cpu_spec_requests_no_gres(tmp_path):
    assert "gpus" not in sbatch_text(JobSpec(nodes=2, folder=str(tmp_path)))
    assert "gpus" not in sbatch_text(JobSpec(nodes=2, gpus_per_node=8, gres=False, folder=str(tmp_path)))


def test_containers(tmp_path):
    pyxis = sbatch_text(JobSpec(folder=str(tmp_path), container=Container(
        image="nvcr.io#nvidia/pytorch:24.05-py3", mounts=["/shared:/shared", "/repo:/repo"], workdir="/repo")))
    assert "--container-image=nvcr.io#nvidia/pytorch:24.05-py3" in pyxis
    assert "--container-mounts=/shared:/shared,/repo:/repo" in pyxis and "--container-workdir=/repo" in pyxis
    apptainer = sbatch_text(JobSpec(folder=str(tmp_path), gpus_per_node=1, container=Container(
        image="/img/train.sif", runtime="apptainer", mounts=["/shared"])))
    assert "apptainer exec --nv --bind /shared /img/train.sif python -u -m submitit.core._submit" in apptainer


def test_spec_rejects_unknown_fields_and_bad_values():
    with pytest.raises(ValueError, match="gpu_per_node"):
        JobSpec(gpu_per_node=8)
    with pytest.raises(ValueError, match="long options"):
        JobSpec(sbatch_extra=["reservation=x"])
    with pytest.raises(ValueError, match="signal_delay_s"):
        JobSpec(time_min=1, signal_delay_s=90)


def test_capacity_against_the_nodes_sinfo_reports():
    nodes = [NodeInfo(f"g{i}", ("gpu",), 64, 8, 1_000_000) for i in range(4)] + [NodeInfo("c1", ("cpu",), 8, 0, 64_000)]
    assert check_capacity(JobSpec(nodes=4, gpus_per_node=8), nodes, "gpu") == []
    assert "at most 8 GPUs" in check_capacity(JobSpec(nodes=1, gpus_per_node=16), nodes, "gpu")[0]
    assert "has 4" in check_capacity(JobSpec(nodes=5, gpus_per_node=8), nodes, "gpu")[0]
    assert "0 GPUs, 1 CPUs and 128 GB" in check_capacity(JobSpec(partition="cpu", mem_gb=128), nodes, "gpu")[0]
