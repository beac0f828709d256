"""Who failed, as data (cluster/failure.py): the records the node check and the launcher write, the cause a
rank's own exception gives, and which record the flow acts on. The flow's end of it (a node that fails its
check is cordoned and the run goes on elsewhere) runs on the real Slurm cluster in test_deployments.py."""

import json

import torch
import torch.distributed as dist

from cluster import failure, rank_exits
from cluster.failure import Failure, exception_cause


def test_a_device_error_points_at_the_host_and_a_python_error_does_not():
    assert exception_cause(dist.DistBackendError("NCCL communicator was aborted")) == "device_error"
    assert exception_cause(torch.AcceleratorError("CUDA error: an illegal memory access")) == (
        "device_error"
    )
    assert exception_cause(RuntimeError("CUDA error: uncorrectable ECC error encountered")) == (
        "device_error"
    )
    assert exception_cause(ValueError("CUDA error in a message of a bad shard")) == "rank_error"
    assert exception_cause(torch.OutOfMemoryError("CUDA out of memory")) == "rank_error"
    assert exception_cause(KeyboardInterrupt()) == "rank_error"


def test_a_rank_record_becomes_the_failure_the_flow_reads():
    rec = rank_exits.RankExit(
        3, 1, "Traceback ...\nRuntimeError: CUDA error: Xid 79\n", 5.0, "n2", "device_error"
    )
    f = rec.failure()
    assert f.blames_host and f.host == "n2" and f.rank == 3
    assert f.line() == "rank 3 on n2 failed first (exit 1): RuntimeError: CUDA error: Xid 79"
    older = rank_exits.RankExit.parse(
        {"rank": 0, "exit_code": 1, "error": "x", "time": 1, "host": "h"}
    )
    assert older.failure().cause == "rank_error"  # a record of an earlier version: nobody's node


def test_the_flow_reads_the_last_attempts_records_and_acts_on_the_one_that_blames_a_host(tmp_path):
    exits = tmp_path / "exits"
    failure.write(
        str(exits / "77_0"), 0, Failure("node_check", "n1", "GPU 0 has 1.0 of 80.0 GiB free")
    )
    failure.write(str(exits / "77_1"), 0, Failure("interrupted", "n1", "SIGTERM"))
    failure.write(str(exits / "77_1"), 1, Failure("node_check", "n2", "injected fault"))
    (exits / "77_1" / "failure_node_2.json").write_text('{"cause": "hacked", "host": "n3"}')
    failure.write(str(exits / "770_5"), 0, Failure("device_error", "n9", "Xid"))  # another job
    found = failure.read_job(str(exits), "77")
    assert [(f.cause, f.host) for f in found] == [("interrupted", "n1"), ("node_check", "n2")]
    assert failure.culprit(found).line() == "node check failed on host n2: injected fault"
    assert failure.culprit([Failure("killed", "n1", "torchrun exited 1")]).blames_host is False
    assert failure.culprit([]) is None and failure.read_job(str(tmp_path / "none"), "77") == []
    assert json.loads((exits / "77_0" / "failure_node_0.json").read_text())["cause"] == "node_check"
