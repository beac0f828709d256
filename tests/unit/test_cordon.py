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
