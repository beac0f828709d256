"""Per-rank telemetry (training/telemetry.py): busy time against step time, the data wait, the window's summary,
and a real 2-rank torchrun job (gloo) whose slowed rank is the one named."""

import json
import os
import subprocess

import pytest
from helpers import REPO, metrics, read_jsonl, train_cmd, train_env

SLOW_RANK = """\
import os
import time

from training import loader, model, train

# rank 1 slowed down: its loader (a slow disk) or its forward pass (a throttled GPU)
if os.environ.get("RANK") == "1":
    cls, name = (loader.ShardLoader, "next_batch") if os.environ["SLOW"] == "data" else (model.GPT, "forward")
    original = getattr(cls, name)

    def slow(*args, **kwargs):
        time.sleep(0.1)
        return original(*args, **kwargs)

    setattr(cls, name, slow)

raise SystemExit(train.main())
"""


@pytest.mark.parametrize("slow", ["data", "compute"])
def test_a_two_rank_job_names_its_slowed_rank_though_every_rank_steps_alike(
    demo_data, tmp_path, slow
):
    (tmp_path / "slow_rank_train.py").write_text(SLOW_RANK)
    run = tmp_path / "run"
    cmd = train_cmd(demo_data, run, nproc=2)
    cmd[cmd.index("training.train")] = "slow_rank_train"
    env = dict(train_env(), PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]), SLOW=slow)
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    windows = read_jsonl(run / "telemetry.jsonl")
    assert [w["step"] for w in windows] == [3, 7] and all(
        w["steps"] == 4 for w in windows
    )  # tiny: every 4 steps
    for w in windows:
        fast, slowed = w["ranks"]
        assert (fast["rank"], slowed["rank"]) == (0, 1) and fast["host"] == slowed["host"]
        # 2 micro-steps of 0.1 s more on rank 1: its busy time shows them ...
        assert slowed["busy_ms"] > fast["busy_ms"] + 150
        # ... its step time does not: rank 0 waits for it in the gradient all-reduce
        assert abs(slowed["step_ms"] - fast["step_ms"]) < 0.3 * (
            slowed["busy_ms"] - fast["busy_ms"]
        )
        if slow == "data":
            assert slowed["data_ms"] >= 200 > 50 > fast["data_ms"]
        else:
            assert slowed["data_ms"] < 50 and fast["data_ms"] < 50
    m = {r["step"]: r for r in metrics(run)}
    for step in (3, 7):
        assert (
            m[step]["slowest_rank"] == 1
            and m[step]["slowest_host"] == windows[0]["ranks"][1]["host"]
        )
        assert m[step]["rank_busy_ms_max"] > m[step]["rank_busy_ms_median"] + 150
    assert not any("slowest_rank" in r for s, r in m.items() if s not in (3, 7))
    beats = {r: json.loads((run / "heartbeats" / f"rank-{r:05d}.json").read_text()) for r in (0, 1)}
    assert beats[1]["busy_s"] > beats[0]["busy_s"]  # what cluster.submit --wait reads
