"""The node check's GPU half, refused on a node without the GPUs asked for. The check as the launcher runs it,
and the all-reduce across nodes: tests/e2e/test_node_check.py."""

import pytest

from cluster.node_check import NodeCheckFailed, check_node, host_name


def test_a_node_that_asks_for_gpus_it_does_not_have_fails(tmp_path):
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() >= 64:
        pytest.skip("this machine has 64 GPUs")
    with pytest.raises(NodeCheckFailed, match=rf"^node check failed on host {host_name()}: .*GPU"):
        check_node(64, str(tmp_path))
