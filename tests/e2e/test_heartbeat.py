"""Heartbeats and the hang detector (common/heartbeat.py): real files, a clock the test moves; the in-job collective
timeout and NCCL's flight recorder settings. The end-to-end cases (a frozen rank cancelled and resubmitted by the
flow) are in test_flows.py."""

import time

from common.heartbeat import read_heartbeats
from common.layout import RunDir


def test_a_collective_that_times_out_names_the_rank_that_did_not_arrive(demo_data, tmp_path):
    """Two real ranks under torchrun (gloo); rank 1 frozen mid-run: rank 0's all-reduce gives up after
    train.collective_timeout_s, and its one-line error names the frozen rank from the heartbeats."""
    import os
    import signal
    import socket
    import subprocess

    from helpers import REPO, train_cmd, train_env

    run = tmp_path / "run"
    err = open(tmp_path / "stderr", "w+")
    proc = subprocess.Popen(
        train_cmd(
            demo_data,
            run,
            "max_steps=400",
            "train.collective_timeout_s=4",
            "train.heartbeat_seconds=0.2",
            nproc=2,
        ),
        cwd=REPO,
        env=train_env(),
        stdout=subprocess.DEVNULL,
        stderr=err,
        start_new_session=True,
    )
    frozen = None
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            beats = read_heartbeats(RunDir(str(run)))
            if frozen is None and (beats.get(1, {}).get("step") or 0) >= 3:
                frozen = beats[1]
                os.kill(frozen["pid"], signal.SIGSTOP)
            if frozen is not None and "a collective timed out" in (tmp_path / "stderr").read_text():
                break
            time.sleep(0.05)
    finally:
        if frozen is not None:
            os.kill(
                frozen["pid"], signal.SIGKILL
            )  # a stopped process would hold torchrun's shutdown
        proc.wait(timeout=120)
    text = (tmp_path / "stderr").read_text()
    line = next((ln for ln in text.splitlines() if "a collective timed out" in ln), None)
    assert frozen is not None and line is not None, text[-4000:]
    print(line)
    assert proc.returncode != 0 and "Traceback" not in line
    assert "a collective timed out after 4 s on rank 0" in line
    assert f"ranks that had not arrived: {socket.gethostname()}:1 (step " in line
    assert ":0 (" not in line  # the rank that waited is not blamed
