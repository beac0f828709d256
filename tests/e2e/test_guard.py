"""Loss spikes and non-finite steps: skipped, counted, and a run that keeps diverging stopped with exit code 3,
deterministically; the poison is the guard's own fault injection (debug.fault_*), a real NaN or spike through
the real training step."""

import json

from helpers import losses, metrics, read_jsonl, run_train

from common.exit_codes import DIVERGED


def test_a_nan_step_is_skipped_and_the_run_completes_the_same_way_twice(demo_data, tmp_path):
    for name in ("a", "b"):
        run_train(demo_data, tmp_path / name, "fault_steps=[3]")
    m = metrics(tmp_path / "a")
    assert [r["step"] for r in m] == list(range(8)) and [r.get("skipped") for r in m].count(
        "non-finite loss"
    ) == 1
    assert m[3].get("skipped") == "non-finite loss" and all(
        r["loss"] == r["loss"] for r in m if r["step"] != 3
    )
    events = read_jsonl(tmp_path / "a" / "events.jsonl")
    assert [(e["event"], e["step"], e["data_batch"], e["reason"]) for e in events] == [
        ("skip", 3, 3, "non-finite loss")
    ]

    def trace(run):
        return [(r["step"], r["loss"], r.get("skipped")) for r in metrics(run) if r["step"] != 3]

    assert trace(tmp_path / "a") == trace(
        tmp_path / "b"
    )  # the same run with the same fault: the same trace
    clean = tmp_path / "clean"
    run_train(demo_data, clean)
    assert (
        losses(clean)[:3] == losses(tmp_path / "a")[:3]
        and losses(clean)[4] != losses(tmp_path / "a")[4]
    )


def test_persistent_divergence_ends_the_job_with_its_own_exit_code(demo_data, tmp_path):
    run = tmp_path / "run"
    p = run_train(
        demo_data,
        run,
        'fault_batches=["2:30"]',
        "max_skips=3",
        "checkpoint_every=2",
        expect=DIVERGED,
    )
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["stopped_by"] == "diverged" and result["diverged"] == {
        "steps": [2, 4],
        "batches": "2:5",
        "reasons": ["non-finite loss"],
    }
    assert read_jsonl(run / "events.jsonl")[-1]["event"] == "diverged"
    assert json.loads((run / "result.json").read_text())["diverged"]["batches"] == "2:5"


def test_skipped_data_batches_are_passed_over_exactly(demo_data, tmp_path):
    """A run told to pass over batches 3:5 reads at step 3 what a plain run reads at step 5."""
    run_train(demo_data, tmp_path / "plain", "max_steps=8")
    run_train(demo_data, tmp_path / "skip", "max_steps=8", 'skip_batches=["3:5"]')
    plain, skip = metrics(tmp_path / "plain"), metrics(tmp_path / "skip")
    assert [r.get("data_batch", r["step"]) for r in skip] == [0, 1, 2, 5, 6, 7, 8, 9]
    assert [r["loss"] for r in skip[:3]] == [r["loss"] for r in plain[:3]]
