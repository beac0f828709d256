"""Data prep as a Slurm job array on the real local cluster (one task per source file, then an assembly job):
the same shard and manifest bytes as one process, and a rerun keeps the parts already tokenized."""

import os
from pathlib import Path

from helpers import PARQUET_SHARD as SHARD
from helpers import shard_files

from cluster.prep_array import submit_prep
from cluster.spec import JobSpec
from common import store
from data_prep import parts, pipeline
from data_prep.sources import open_source


def test_job_array_writes_the_same_bytes_as_one_process(
    slurm_cluster, parquet_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    one = str(tmp_path / "one")
    pipeline.build(one, open_source(str(parquet_dir)), SHARD, 1, progress=False)

    out, folder = str(tmp_path / "array"), str(tmp_path / "slurm")
    spec = JobSpec(folder=folder, time_min=20, sbatch_extra=["--comment=gpt2-prep-test"])
    jobs = submit_prep(str(parquet_dir), out, spec, shard_tokens=SHARD)
    assert len(jobs.array) == 3  # one array task per file
    scripts = sorted(Path(folder).glob("*_submission.sh"))
    assert (
        len(scripts) == 2
    )  # the array and the assembly job, each shaped by every field of the spec
    assert all("#SBATCH --comment=gpt2-prep-test\n" in p.read_text() for p in scripts)
    manifest = jobs.wait()
    assert shard_files(out) == shard_files(one)
    assert store.read_bytes(store.join(out, "manifest.json")) == store.read_bytes(
        store.join(one, "manifest.json")
    )
    assert manifest["documents"] == store.read_json(store.join(one, "manifest.json"))["documents"]

    # A rerun after losing the shards (e.g. the assembly job died): parts already tokenized are not redone.
    first = {i: os.stat(parts.part_url(out, i)).st_mtime_ns for i in range(3)}
    for name in [n for n in store.listdir(out) if n.endswith((".npy", ".json"))]:
        os.remove(os.path.join(out, name))
    submit_prep(str(parquet_dir), out, spec, shard_tokens=SHARD).wait()
    assert {i: os.stat(parts.part_url(out, i)).st_mtime_ns for i in range(3)} == first
    assert shard_files(out) == shard_files(one)


def test_prepare_data_flow_runs_the_job_array(
    prefect_server, slurm_cluster, parquet_dir, tmp_path, monkeypatch
):
    """The prepare-data flow with `slurm` set, on a real (temporary) Prefect server and the local cluster."""
    import asyncio

    from flows.prepare_data import prepare_data

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    one = str(tmp_path / "one")
    pipeline.build(one, open_source(str(parquet_dir)), SHARD, 1, progress=False)
    out = str(tmp_path / "flow")
    result = asyncio.run(
        prepare_data(
            source=str(parquet_dir),
            out=out,
            shard_tokens=SHARD,
            slurm=JobSpec(time_min=20, folder=str(tmp_path / "slurm")),
        )
    )
    assert result["shards"] == len(store.read_json(store.join(one, "manifest.json"))["shards"])
    assert store.read_bytes(store.join(out, "manifest.json")) == store.read_bytes(
        store.join(one, "manifest.json")
    )
    assert list(
        (tmp_path / "slurm").glob("*_2_0_result.pkl")
    )  # the third file's array task ran under Slurm
