"""The run's cordon list (cluster/cordon.py) and how a Slurm submission avoids its hosts. The end-to-end case (a
hung job's node cordoned and the run finished on another node) is in test_deployments.py."""

from cluster.cordon import cordon, cordoned, host_to_blame
from cluster.spec import JobSpec, with_excluded
from common.layout import RunDir


def test_a_cordon_holds_until_it_expires_and_the_latest_line_per_host_wins(tmp_path):
    run = RunDir(str(tmp_path))
    assert cordoned(run) == {}
    cordon(run, "n1", "hung: hang at step 7", hours=1, now=1000.0)
    cordon(run, "n2", "failed: NODE_FAIL", hours=2, now=1000.0)
    assert set(cordoned(run, now=1000.0 + 3599)) == {"n1", "n2"}
    assert set(cordoned(run, now=1000.0 + 3601)) == {"n2"}
    cordon(
        run, "n2", "released by hand", hours=0, now=2000.0
    )  # a line that has already expired releases it
    assert cordoned(run, now=2001.0) == {
        "n1": {"host": "n1", "reason": "hung: hang at step 7", "time": 1000.0, "expires": 4600.0}
    }
    with open(run.cordon, "a") as f:
        # by a person
        f.write('{"host": "n4", "expires": "never"}\n[1]\n{"host": 5, "expires": 9999}\n')
        f.write('{"host": "n3", "rea')  # torn by a killed writer: ignored, the rest still read
    assert set(cordoned(run, now=2001.0)) == {"n1"}


def test_only_a_failure_confined_to_one_known_host_blames_it():
    assert host_to_blame(["n3:4", "n3:5"]) == "n3"
    assert host_to_blame(["n3:4", "n4:8"]) is None  # two hosts: the network, the storage, anything
    assert host_to_blame([]) is None
    assert host_to_blame(["?:1 (never beat)"]) is None


def test_excluded_hosts_merge_with_the_specs_own_exclude():
    spec = JobSpec(sbatch_extra=["--reservation=big", "--exclude=n9"])
    assert with_excluded(spec, ()) is spec
    assert with_excluded(spec, ("n1", "n9")).sbatch_extra == [
        "--reservation=big",
        "--exclude=n9,n1",
    ]
    assert with_excluded(JobSpec(), ("n2",)).sbatch_extra == ["--exclude=n2"]


def test_a_shrunk_job_takes_the_most_nodes_its_batch_splits_over():
    from flows.slurm_executor import shrink_to
    from training.config import load_config

    cfg = load_config(
        "tiny", ["micro_batch=2", "seq_len=32", "total_batch_tokens=512", "val_tokens=256"]
    )
    assert shrink_to(cfg, 7, 1) == 4  # 512 tokens = 8 micro-batches of 64: not over 7, 6 or 5 ranks
    assert shrink_to(cfg, 3, 2) == 2  # 2 GPUs per node: 4 ranks
    assert shrink_to(cfg, 0, 1) is None


def test_a_run_with_every_node_cordoned_waits_for_the_first_to_expire_if_it_expires_soon():
    """Two nodes that failed in a row under short cordons: the supervisor says it waits and submits once the
    first expires; cordons that last hours stop the run with the executor's own words."""
    import asyncio
    import logging
    import time
    from types import SimpleNamespace

    import pytest

    from flows.executors import Placement, PlacementError
    from flows.supervisor import CORDON_WAIT_S, FlowFailure, RunSupervisor

    class Executor:
        def __init__(self, free_at):
            self.free_at, self.calls = free_at, 0

        def placement(self, cfg, run, allow_shrink):
            self.calls += 1
            if time.time() < self.free_at:
                raise PlacementError(
                    "partition debug can no longer give the job its 1 nodes", self.free_at
                )
            return Placement(self, ())

    said = []
    log = logging.getLogger("test")
    log.warning = lambda fmt, *a: said.append(fmt % a)  # type: ignore[method-assign]

    def sup(executor):
        p = SimpleNamespace(resubmission=SimpleNamespace(allow_shrink=False))
        return SimpleNamespace(executor=executor, cfg=None, run=None, p=p, log=log)

    soon = Executor(time.time() + 0.5)
    t0 = time.time()
    where = asyncio.run(RunSupervisor.placed(sup(soon)))  # type: ignore[arg-type]
    assert where.executor is soon and soon.calls == 2 and 0.5 <= time.time() - t0 < 5
    assert said and said[0].startswith(
        "partition debug can no longer give the job its 1 nodes. Waiting"
    )
    later = Executor(time.time() + CORDON_WAIT_S + 60)
    with pytest.raises(
        FlowFailure, match="^partition debug can no longer give the job its 1 nodes$"
    ):
        asyncio.run(RunSupervisor.placed(sup(later)))  # type: ignore[arg-type]
