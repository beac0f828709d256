"""The check each node of a training job passes before torchrun starts: its GPUs are there, idle and working,
and the run directory answers from it. A node that fails ends the job at once, naming its host, so that the
flow cordons it (cluster/cordon.py) instead of the job hanging in a rendezvous or failing mid-step.

In a job of several nodes, the nodes that pass then meet in one all-reduce (`join_nodes`): node 0 hosts a
TCPStore, every node registers in it, and once all have joined each adds a one (gloo on CPU, NCCL on GPU 0)
and must see the number of nodes. A node that does not join within `--join-timeout-s` (unreachable, wedged,
never started) is named by node 0 from the job's host list; a node that cannot reach node 0 names node 0's
host; a node whose all-reduce fails or sums wrong names its own. Node 0's verdict is also every joined node's,
so that whichever task's line reaches the flow blames the same host.

Fault injection for tests (the emulated cluster's nodes are healthy): GPT2_NODE_CHECK_FAIL_ONCE=<path> fails
the first node that finds no file there, after creating it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

from cluster.failure import Cause, Failure
from common import store
from common.errors import last_line
from common.heartbeat import host_name

REPO = Path(__file__).resolve().parent.parent
log = logging.getLogger("cluster.node_check")


class NodeCheckFailed(Exception):
    """A node unfit to train on (or, cause check_not_run, a check that could not run there through no fault
    of the node): `failure` says which host and why; the message is its line."""

    def __init__(self, host: str, detail: str, cause: Cause = "node_check"):
        self.failure = Failure(cause, host, detail)
        super().__init__(self.failure.line())


def run_node_check(
    gpus: int,
    run_dir: str,
    timeout_s: float = 180.0,
    *,
    node: int = 0,
    hosts: list[str] | tuple[str, ...] = (),
    port: int = 0,
    join_timeout_s: float = 120.0,
) -> Failure | None:
    """The check in a process of its own (its CUDA contexts must not stay in the launcher, and a wedged GPU
    must not hang it): None when the node is fit, else the failure (its host and why). With more than one
    host, node `node` of `hosts` also joins the all-reduce across them (node 0's store on `port`)."""
    cmd = [sys.executable, "-m", "cluster.node_check", "--gpus", str(gpus), "--run-dir", run_dir]
    if len(hosts) > 1:
        cmd += [
            "--node",
            str(node),
            "--hosts",
            ",".join(hosts),
            "--port",
            str(port),
            "--join-timeout-s",
            str(join_timeout_s),
        ]
        # join_nodes bounds itself by 3 join timeouts (reach node 0, its verdict, the all-reduce) and a few
        # seconds; this outer limit must not fire first, or it would blame this host for a missing node
        timeout_s += 3 * join_timeout_s + 30
    try:
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return Failure(
            "node_check", host_name(), f"no answer within {timeout_s:.0f} s (a wedged GPU?)"
        )
    if p.returncode == 0:
        for ln in p.stdout.splitlines():
            if ln.startswith("node check passed"):  # the all-reduce's time, for the task's log
                log.info("%s", ln)
        return None
    try:  # the check's verdict: its last line on stdout is the failure record
        return Failure.parse(json.loads(p.stdout.strip().splitlines()[-1]))
    except (IndexError, ValueError):
        pass
    if p.returncode in (-signal.SIGTERM, -signal.SIGKILL, -signal.SIGINT):
        # Stopped from outside: srun ending the step because another node's task failed, or a cancellation.
        # Not this host's fault, so not a failed check (the flow would cordon this host).
        return Failure("interrupted", host_name(), signal.Signals(-p.returncode).name)
    return Failure(
        "node_check", host_name(), f"exit {p.returncode}: {last_line(p.stdout + p.stderr)}"
    )


def check_node(gpus: int, run_dir: str, min_free_fraction: float = 0.9) -> None:
    host = host_name()
    problems = []
    once = os.environ.get("GPT2_NODE_CHECK_FAIL_ONCE")
    if once:
        try:
            with open(once, "x"):
                problems.append("injected fault (GPT2_NODE_CHECK_FAIL_ONCE)")
        except FileExistsError:
            pass
    if gpus:
        problems += _gpu_problems(gpus, min_free_fraction)
    try:
        store.preflight(run_dir, write=False)
    except store.StoreError as err:
        problems.append(str(err))
    if problems:
        raise NodeCheckFailed(host, "; ".join(problems))


def _gpu_problems(gpus: int, min_free_fraction: float) -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return [f"no CUDA device visible (the job asked for {gpus} GPUs)"]
    n = torch.cuda.device_count()
    if n < gpus:
        return [f"{n} GPUs visible, the job needs {gpus}"]
    out = []
    for i in range(gpus):
        try:
            free, total = torch.cuda.mem_get_info(i)
            if (
                free < min_free_fraction * total
            ):  # another process holds it: a leftover of a killed job
                out.append(f"GPU {i} has {free / 2**30:.1f} of {total / 2**30:.1f} GiB free")
            x = torch.randn(256, 256, device=f"cuda:{i}")
            if not torch.isfinite(x @ x).all():
                out.append(f"GPU {i} computes non-finite products")
        except RuntimeError as err:  # an ECC error, a fallen-off-the-bus device
            out.append(f"GPU {i}: {str(err).splitlines()[0]}")
    return out


_KEY = "node_check"


def join_nodes(
    node: int, hosts: list[str], port: int, gpus: int, timeout_s: float = 120.0
) -> float:
    """One all-reduce across the job's nodes (`hosts`, in node order; node 0's store listens on `port`):
    returns its seconds, or raises NodeCheckFailed naming the host to blame.

    Node 0 waits up to `timeout_s` for the others to register, then sets a verdict ("go" or its failure
    record). Another node waits up to `timeout_s` to reach the store, then up to `timeout_s` more for the
    verdict (node 0 may have started its wait later, after slower checks of its own). The all-reduce is
    bounded by `timeout_s` too."""
    meeting = _Meeting(node, hosts, port, timeout_s)
    st = meeting.host() if node == 0 else meeting.join()
    seconds = meeting.all_reduce(st, gpus)
    if node == 0:  # the store must outlive the others' last calls to it
        _wait_quietly(st, meeting.done[1:], 10.0)
    else:
        _set_quietly(st, meeting.done[node])
    return seconds


class _Meeting:
    """The nodes of one job meeting in node 0's TCPStore, then in one all-reduce."""

    def __init__(self, node: int, hosts: list[str], port: int, timeout_s: float):
        self.node, self.hosts, self.port, self.timeout_s = node, hosts, port, timeout_s
        self.me, self.n, self.wait = host_name(), len(hosts), timedelta(seconds=timeout_s)
        self.joined = [f"{_KEY}/joined/{i}" for i in range(self.n)]
        self.done = [f"{_KEY}/done/{i}" for i in range(self.n)]
        self.verdict = f"{_KEY}/verdict"
        self.within = f"the all-reduce across nodes within {timeout_s:.0f} s"
        self.seen = f"(seen from {self.me})"

    def host(self):
        """Node 0: the store, the others' registrations awaited, the verdict set."""
        import torch.distributed as dist

        try:
            st = dist.TCPStore(
                self.hosts[0],
                self.port,
                self.n,
                is_master=True,
                timeout=self.wait,
                wait_for_workers=False,
            )
        except RuntimeError as err:  # the port is taken: not the node's fault, so not to cordon it
            raise NodeCheckFailed(
                self.me,
                f"port {self.port} for the all-reduce across nodes is taken ({_first_line(err)})",
                "check_not_run",
            ) from None
        try:
            st.wait(self.joined[1:], self.wait)
        except RuntimeError:  # timed out: who is missing is read below
            pass
        missing = [i for i in range(1, self.n) if not st.check([self.joined[i]])]
        if missing:
            names = [self.hosts[i] for i in missing]
            what = (
                f"did not join {self.within} {self.seen}"
                if len(names) == 1
                else f"{len(names)} nodes did not join {self.within}: {', '.join(names)} {self.seen}"
            )
            failed = NodeCheckFailed(names[0], what)
            st.set(self.verdict, json.dumps(asdict(failed.failure)))
            present = [self.done[i] for i in range(1, self.n) if i not in missing]
            _wait_quietly(st, present, 5.0)  # they read it
            raise failed
        st.set(self.verdict, "go")
        return st

    def join(self):
        """Another node: node 0's store reached, this node registered, node 0's verdict read."""
        import torch.distributed as dist

        try:
            _reach(self.hosts[0], self.port, time.monotonic() + self.timeout_s)
            st = dist.TCPStore(
                self.hosts[0],
                self.port,
                self.n,
                is_master=False,
                timeout=self.wait,
                wait_for_workers=False,
            )
        except (OSError, RuntimeError):
            raise NodeCheckFailed(
                self.hosts[0],
                f"node 0's store on port {self.port} did not answer for {self.within} {self.seen}",
            ) from None
        try:
            st.set(self.joined[self.node], self.me)
            st.wait([self.verdict], self.wait + timedelta(seconds=10))
            verdict = st.get(self.verdict).decode()
        except RuntimeError as err:  # node 0 died or hangs after we reached it
            raise NodeCheckFailed(
                self.hosts[0],
                f"node 0 gave no verdict on {self.within} {self.seen}: {_first_line(err)}",
            ) from None
        if verdict != "go":  # node 0's failure: whichever node's record reaches the flow, one host
            _set_quietly(st, self.done[self.node])
            f = Failure.parse(json.loads(verdict))
            raise NodeCheckFailed(f.host, f.detail, f.cause)
        return st

    def all_reduce(self, st, gpus: int) -> float:
        """A one from every node, summed (NCCL on GPU 0, else gloo): its seconds; the sum must be the count."""
        import torch
        import torch.distributed as dist

        t0 = time.monotonic()
        try:
            if gpus:
                torch.cuda.set_device(0)
            dist.init_process_group(
                "nccl" if gpus else "gloo",
                store=st,
                rank=self.node,
                world_size=self.n,
                timeout=self.wait,
            )
            try:
                x = torch.ones(1, device="cuda:0" if gpus else "cpu")
                dist.all_reduce(x)
                total = x.item()
            finally:
                dist.destroy_process_group()
        except RuntimeError as err:
            raise NodeCheckFailed(
                self.me, f"the all-reduce across {self.n} nodes failed: {_first_line(err)}"
            ) from None
        if total != self.n:
            raise NodeCheckFailed(
                self.me, f"the all-reduce across {self.n} nodes summed to {total:g}, not {self.n}"
            )
        return time.monotonic() - t0


def _reach(host: str, port: int, deadline: float) -> None:
    """Returns once `host` accepts connections on `port`, else raises OSError at `deadline`. The store's own
    client retries with a backoff that can overrun its timeout by as much again."""
    while True:
        try:
            socket.create_connection(
                (host, port), timeout=max(0.1, min(5.0, deadline - time.monotonic()))
            ).close()
            return
        except OSError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.25)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _wait_quietly(st, keys: list[str], seconds: float) -> None:
    try:
        if keys:
            st.wait(keys, timedelta(seconds=seconds))
    except RuntimeError:
        pass


def _set_quietly(st, key: str) -> None:
    try:
        st.set(key, "1")
    except RuntimeError:
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m cluster.node_check", description="Is this node fit to train on?"
    )
    ap.add_argument("--gpus", type=int, default=0)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--node", type=int, default=0, help="this node's index in --hosts")
    ap.add_argument(
        "--hosts",
        default="",
        help="the job's hosts in node order, comma-separated; with more than "
        "one, the nodes also meet in an all-reduce",
    )
    ap.add_argument("--port", type=int, default=0, help="where node 0 hosts the all-reduce's store")
    ap.add_argument(
        "--join-timeout-s",
        type=float,
        default=120.0,
        help="how long node 0 waits for the others to join (and they for node 0)",
    )
    args = ap.parse_args(argv)
    hosts = [h for h in args.hosts.split(",") if h]
    if len(hosts) > 1 and not (0 <= args.node < len(hosts) and args.port > 0):
        ap.error("--node must index --hosts and --port is required with several hosts")
    try:
        check_node(args.gpus, args.run_dir)
        if len(hosts) > 1:
            seconds = join_nodes(args.node, hosts, args.port, args.gpus, args.join_timeout_s)
            print(
                f"node check passed on host {host_name()}: all-reduce across {len(hosts)} nodes in "
                f"{seconds:.2f} s",
                flush=True,
            )
    except NodeCheckFailed as err:  # the line for a person, then the record for the launcher
        print(err, file=sys.stderr, flush=True)
        print(json.dumps(asdict(err.failure)), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
