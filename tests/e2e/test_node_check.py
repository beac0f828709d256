"""The check each node passes before torchrun (cluster/node_check.py), run as the launcher runs it: in a
process of its own. Its GPU half runs on GPU nodes (test_gpu.py); the Slurm case (a node failing it is cordoned
and the run goes on elsewhere) is in test_deployments.py. The all-reduce across nodes runs here with both
nodes on this machine: node 0 is called "localhost", node 1 "127.0.0.1", so that a line names which one."""

import socket
import threading
import time

from cluster.node_check import host_name, run_node_check


def test_a_healthy_cpu_node_passes(tmp_path):
    assert run_node_check(0, str(tmp_path / "run")) is None


def test_a_failing_node_is_one_line_naming_its_host(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_NODE_CHECK_FAIL_ONCE", str(tmp_path / "fault"))
    failure = run_node_check(0, str(tmp_path / "run"))
    assert failure.cause == "node_check" and failure.blames_host and failure.host == host_name()
    assert failure.line() == (
        f"node check failed on host {host_name()}: injected fault (GPT2_NODE_CHECK_FAIL_ONCE)"
    )
    assert run_node_check(0, str(tmp_path / "run")) is None  # once: the next node passes


HOSTS = ["localhost", "127.0.0.1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_nodes(nodes, run_dir, join_timeout_s, hosts=HOSTS):
    """run_node_check for each of `nodes` at once, as each node's launcher does: their failures' lines, and
    seconds."""
    port, lines = free_port(), {}

    def one(node):
        failure = run_node_check(
            0, run_dir, node=node, hosts=hosts, port=port, join_timeout_s=join_timeout_s
        )
        lines[node] = failure and failure.line()

    t0 = time.monotonic()
    threads = [threading.Thread(target=one, args=(n,)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lines, time.monotonic() - t0


def test_two_nodes_that_both_start_pass_the_all_reduce(tmp_path):
    lines, _ = check_nodes([0, 1], str(tmp_path / "run"), 30)
    assert lines == {0: None, 1: None}


def test_node_0_names_a_node_that_never_joins(tmp_path):
    lines, seconds = check_nodes([0], str(tmp_path / "run"), 3)
    assert lines[0] == (
        "node check failed on host 127.0.0.1: did not join the all-reduce across nodes within "
        f"3 s (seen from {host_name()})"
    )
    assert seconds < 15


def test_a_node_that_cannot_reach_node_0_names_node_0s_host(tmp_path):
    lines, seconds = check_nodes([1], str(tmp_path / "run"), 3)
    assert lines[1].startswith("node check failed on host localhost: node 0's store on port ")
    assert "within 3 s" in lines[1]
    assert seconds < 15


def test_a_node_that_joined_reports_node_0s_verdict(tmp_path):
    # node 1 ("n-absent") never starts: node 2 blames the same host as node 0, whichever line reaches the flow
    lines, _ = check_nodes(
        [0, 2], str(tmp_path / "run"), 3, hosts=["localhost", "n-absent", "127.0.0.1"]
    )
    assert (
        lines[0]
        == lines[2]
        == (
            "node check failed on host n-absent: did not join the all-reduce across nodes "
            f"within 3 s (seen from {host_name()})"
        )
    )
