"""The flow's watcher on its own (flows/watch.py): new whole lines of a growing file, torn ones skipped, and a
straggling rank said once and kept once; the job record a restarted flow reattaches by. The flow itself:
tests/e2e/test_flows.py."""

import asyncio

import pytest

# prefect configures logging when first imported: at collection, so that it does not take caplog's handler off
# the root logger in the middle of a test run on its own
import flows.watch  # noqa: F401


def test_the_flow_reads_only_new_whole_lines_and_skips_torn_ones(tmp_path):
    from common.logfiles import LogTail
    from training.metrics import parse_metrics

    f = tmp_path / "metrics.jsonl"
    tail = LogTail(str(f))
    assert tail.read() == []  # not there yet
    f.write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "lo')  # a writer killed mid-line
    assert parse_metrics(tail.read()) == [{"step": 0, "loss": 1.0}]
    with open(f, "a") as out:  # the resumed run appends after the torn fragment
        out.write('{"step": 1, "loss": 0.9}\n{"step": 2, "loss": 0.8}\n')
    assert parse_metrics(tail.read()) == [
        {"step": 2, "loss": 0.8}
    ]  # the torn line is skipped, nothing re-read
    f.write_text('{"step": 0, "loss": 2.0}\n')  # truncated and rewritten: read from the start again
    assert parse_metrics(tail.read()) == [{"step": 0, "loss": 2.0}]


def test_a_val_curve_reads_only_what_was_added_and_a_resumed_run_replaces_the_steps_it_redoes(
    tmp_path, monkeypatch
):
    import json

    from common import store
    from training.metrics import ValCurve

    f = tmp_path / "metrics.jsonl"

    def write(rows, mode="a"):
        with open(f, mode) as out:
            out.writelines(json.dumps(r) + "\n" for r in rows)

    curve = ValCurve(str(tmp_path))
    assert curve.read() == []
    write(
        [
            {"step": s, "loss": 5.0, **({"val_loss": 9.0 - s} if s % 2 == 0 else {})}
            for s in range(5)
        ]
    )
    assert curve.read() == [(0, 9.0), (2, 7.0), (4, 5.0)]
    # the bytes read from here on are only the new ones
    read = []
    real = store.fs_and_path

    def spy(url):
        fs, path = real(url)
        opened = fs.open

        class Counting:
            def __getattr__(self, name):
                return getattr(fs, name)

            def open(self, p, mode="rb"):
                handle = opened(p, mode)
                here = handle.read
                handle.read = lambda n=-1: read.append(len(data := here(n))) or data
                return handle

        return Counting(), path

    monkeypatch.setattr(store, "fs_and_path", spy)
    write([{"step": 5, "loss": 4.0}, {"step": 6, "loss": 4.0, "val_loss": 4.5}])
    added = len(json.dumps({"step": 5, "loss": 4.0})) + len(
        json.dumps({"step": 6, "loss": 4.0, "val_loss": 4.5})
    )
    assert curve.read() == [(0, 9.0), (2, 7.0), (4, 5.0), (6, 4.5)] and read == [added + 2]
    # resumed from a checkpoint at step 3: it drops the lines after it and writes its steps again
    write([{"step": 3, "loss": 4.0}, {"step": 4, "loss": 4.0, "val_loss": 6.5}])
    assert curve.read() == [(0, 9.0), (2, 7.0), (4, 6.5)]


def test_a_rank_slower_than_the_median_in_consecutive_windows_is_one_warning_and_one_event(
    tmp_path, caplog
):
    """From the telemetry summaries in the metrics lines (training/telemetry.py), as the watcher reads them."""
    import json
    import logging

    from cluster.resubmission import Outcome
    from common.layout import RunDir
    from flows.watch import RunWatcher
    from training.telemetry import StragglerWatch

    run = RunDir(str(tmp_path))
    rows = [{"step": s, "loss": 3.0} for s in range(40)]
    for s in (9, 19, 29, 39):  # rank 3 on n2 is 40% slower than the median rank in every window
        rows[s].update(
            slowest_rank=3, slowest_host="n2", rank_busy_ms_max=140.0, rank_busy_ms_median=100.0
        )
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    class Done:
        job_id, log_path = "local-1", str(tmp_path / "console.log")

        def poll(self):
            return Outcome("completed", "exit 0")

    found = []

    async def on_straggler(s):
        found.append(s)

    async def on_tick(metrics):
        pass

    log = logging.getLogger("test-stragglers")
    watcher = RunWatcher(
        run, log, 0.01, stragglers=StragglerWatch(0.10, 3), on_straggler=on_straggler
    )
    with caplog.at_level(logging.WARNING, logger="test-stragglers"):
        asyncio.run(watcher.watch(Done(), on_tick))
    assert [(s.rank, s.host, s.step) for s in found] == [(3, "n2", 29)]
    assert [r.message for r in caplog.records] == [
        "rank 3 on n2 is a straggler: 140 ms busy per step against the median rank's 100 ms (+40%) in 3 telemetry "
        "windows in a row, up to step 29"
    ]
    # recorded in the run directory for the tracker mirror and later flow runs, once
    kept = [json.loads(line) for line in (tmp_path / "stragglers.jsonl").read_text().splitlines()]
    assert [(r["event"], r["rank"], r["host"], r["step"], r["busy_ms"]) for r in kept] == [
        ("straggler", 3, "n2", 29, 140.0)
    ]
    again = RunWatcher(
        run, log, 0.01, stragglers=StragglerWatch(0.10, 3), on_straggler=on_straggler
    )
    assert [r["step"] for r in again.earlier_stragglers] == [29]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="test-stragglers"):
        asyncio.run(
            again.watch(Done(), on_tick)
        )  # a restarted flow reads the same metrics: said once, kept once
    assert (
        len(found) == 1
        and not caplog.records
        and (tmp_path / "stragglers.jsonl").read_text().count("\n") == 1
    )
    from tracking.records import read_records

    [event] = [e for e in read_records(str(tmp_path)).events if e["source"] == "stragglers"]
    assert (
        event["event"] == "straggler" and event["step"] == 29 and "rank 3 on n2" in event["detail"]
    )


@pytest.mark.parametrize(
    "text", ["{not json", "[1]", '{"submission": "two", "job_id": "7"}', '{"submission": 2}']
)
def test_a_job_record_that_is_no_job_record_is_not_reattached_to(tmp_path, text, caplog):
    """job.json names the submission a restarted flow reattaches to: a torn or edited one is said and left,
    and the submissions are counted from submissions.jsonl instead."""
    from cluster.run_records import in_flight
    from common.layout import RunDir
    from flows.executors import LocalTrainingExecutor

    run = RunDir(str(tmp_path))
    (tmp_path / "job.json").write_text(text)
    (tmp_path / "submissions.jsonl").write_text('{"submission": 1}\n{"submission": 2}\n')
    with caplog.at_level("WARNING"):
        assert in_flight(run, LocalTrainingExecutor()) == (None, 2)
    assert "is not a job record" in caplog.text
