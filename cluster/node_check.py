"""The check each node of a training job passes before torchrun starts: its GPUs are there, idle and working,
and the run directory answers from it. A node that fails ends the job at once, naming its host, so that the
flow cordons it (flows/cordon.py) instead of the job hanging in a rendezvous or failing mid-step.

Fault injection for tests (the emulated cluster's nodes are healthy): GPT2_NODE_CHECK_FAIL_ONCE=<path> fails
the first node that finds no file there, after creating it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from common import store
from common.heartbeat import host_name

REPO = Path(__file__).resolve().parent.parent


class NodeCheckFailed(Exception):
    """A node unfit to train on; the message starts with `node check failed on host <host>:`."""


def run_node_check(gpus: int, run_dir: str, timeout_s: float = 180.0) -> str | None:
    """The check in a process of its own (its CUDA contexts must not stay in the launcher, and a wedged GPU
    must not hang it): None when the node is fit, else the one line saying why not."""
    cmd = [sys.executable, "-m", "cluster.node_check", "--gpus", str(gpus), "--run-dir", run_dir]
    try:
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"node check failed on host {host_name()}: no answer within {timeout_s:.0f} s (a wedged GPU?)"
    if p.returncode == 0:
        return None
    lines = (p.stdout + p.stderr).strip().splitlines()
    return next((ln for ln in lines if ln.startswith("node check failed")),
                f"node check failed on host {host_name()}: exit {p.returncode}: {lines[-1] if lines else ''}")


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
        raise NodeCheckFailed(f"node check failed on host {host}: {'; '.join(problems)}")


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
            if free < min_free_fraction * total:  # another process holds it: a leftover of a killed job
                out.append(f"GPU {i} has {free / 2**30:.1f} of {total / 2**30:.1f} GiB free")
            x = torch.randn(256, 256, device=f"cuda:{i}")
            if not torch.isfinite(x @ x).all():
                out.append(f"GPU {i} computes non-finite products")
        except RuntimeError as err:  # an ECC error, a fallen-off-the-bus device
            out.append(f"GPU {i}: {str(err).splitlines()[0]}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cluster.node_check", description="Is this node fit to train on?")
    ap.add_argument("--gpus", type=int, default=0)
    ap.add_argument("--run-dir", required=True)
    args = ap.parse_args(argv)
    try:
        check_node(args.gpus, args.run_dir)
    except NodeCheckFailed as err:
        print(err, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
