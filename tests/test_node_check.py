"""The check each node passes before torchrun (cluster/node_check.py), run as the launcher runs it: in a
process of its own. Its GPU half runs on GPU nodes (test_gpu.py); the Slurm case (a node failing it is cordoned
and the run goes on elsewhere) is in test_deployments.py."""

import pytest

from cluster.node_check import NodeCheckFailed, check_node, host_name, run_node_check


def test_a_healthy_cpu_node_passes(tmp_path):
    assert run_node_check(0, str(tmp_path / "run")) is None


def test_a_failing_node_is_one_line_naming_its_host(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_NODE_CHECK_FAIL_ONCE", str(tmp_path / "fault"))
    line = run_node_check(0, str(tmp_path / "run"))
    assert line == f"node check failed on host {host_name()}: injected fault (GPT2_NODE_CHECK_FAIL_ONCE)"
    assert run_node_check(0, str(tmp_path / "run")) is None  # once: the next node passes


def test_a_node_that_asks_for_gpus_it_does_not_have_fails(tmp_path):
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() >= 64:
        pytest.skip("this machine has 64 GPUs")
    with pytest.raises(NodeCheckFailed, match=rf"^node check failed on host {host_name()}: .*GPU"):
        check_node(64, str(tmp_path))
