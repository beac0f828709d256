"""The run's cordon list (cluster/cordon.py) and how a Slurm submission avoids its hosts. The end-to-end case (a
hung job's node cordoned and the run finished on another node) is in test_deployments.py."""

from cluster.cordon import cordon
from cluster.spec import JobSpec
from common.layout import RunDir


def test_a_partition_left_too_few_nodes_stops_the_run_plainly_or_with_allow_shrink_runs_on_the_rest(
    slurm_cluster, tmp_path
):
    """Against the real cluster's sinfo (nodes n1, n2): a 2-node job with n1 cordoned."""
    import pytest

    from flows.executors import PlacementError
    from flows.slurm_executor import SlurmTrainingExecutor, shrink_to
    from training.config import load_config

    run = RunDir(str(tmp_path))
    cordon(run, "n1", "failed: node check", hours=1)
    cfg = load_config(
        "tiny", ["micro_batch=2", "seq_len=32", "total_batch_tokens=128", "val_tokens=128"]
    )
    executor = SlurmTrainingExecutor(JobSpec(nodes=2, partition="debug"))
    with pytest.raises(
        PlacementError,
        match=r"^partition debug can no longer give the job its 2 nodes: 1 usable \(n2\) "
        r"with n1 cordoned in .*; .* or set allow_shrink$",
    ):
        executor.placement(cfg, run, allow_shrink=False)
    where = executor.placement(cfg, run, allow_shrink=True)
    assert (where.exclude, where.shrunk_to, where.executor.spec.nodes) == (("n1",), 1, 1)
    assert shrink_to(cfg, 1, 1) == 1


def test_a_pending_job_kept_off_every_node_starts_once_their_cordons_expire(
    slurm_cluster, demo_data, tmp_path, monkeypatch
):
    """Every node kept out for a moment (n2 by the job's own spec, n1 by a cordon): the job waits
    (BadConstraints). When the cordon expires the flow's Slurm submission lifts it from the pending job, which
    then runs on n1; the host its own spec excludes stays excluded."""
    import subprocess
    import time

    from helpers import TRAIN_BASE

    from flows.slurm_executor import SlurmTrainingExecutor

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = RunDir(str(tmp_path / "run"))
    cordon(run, "n1", "node failure", hours=0.5 / 3600)  # expires in half a second
    spec = JobSpec(nodes=1, time_min=20, partition="debug", folder=str(tmp_path / "slurm"))
    spec = spec.model_copy(update={"sbatch_extra": ["--exclude=n2", "--begin=now+600"]})
    sets = [*TRAIN_BASE, "max_steps=2", f"data_url={demo_data}", f"run_dir={run.url}"]
    sub = SlurmTrainingExecutor(spec).submit("tiny", sets, run, 1)
    try:  # as the flow does when n1 fails under the job and Slurm requeues it (sbatch refuses it outright)
        assert sub.avoid(("n1",))
        subprocess.run(["scontrol", "update", f"JobId={sub.job_id}", "StartTime=now"], check=True)
        assert sorted(sub._excluded()) == ["n1", "n2"]  # nowhere to run: Slurm says BadConstraints
        deadline, outcome = time.time() + 180, None
        while outcome is None and time.time() < deadline:
            outcome = sub.poll()
            time.sleep(0.5)
        assert outcome is not None and outcome.state == "completed", outcome
        assert sub._excluded() == ["n2"]
    finally:
        subprocess.run(["scancel", sub.job_id], capture_output=True)
