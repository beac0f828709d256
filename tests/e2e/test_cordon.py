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
