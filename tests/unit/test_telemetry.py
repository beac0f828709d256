"""Per-rank telemetry (training/telemetry.py): busy time against step time, the data wait, the window's summary
and the straggler count. A real 2-rank torchrun job whose slowed rank is named: tests/e2e/test_telemetry.py."""

import time

import torch

from training.config import load_config
from training.distributed import DistInfo
from training.model import GPT
from training.telemetry import RankTelemetry, window_summary


def test_busy_time_ends_at_the_last_gradient_and_the_data_wait_is_the_loaders():
    model = GPT(load_config("tiny").model)
    tel = RankTelemetry(
        2,
        DistInfo(),
        torch.device("cpu"),
        last_grads=[model.transformer.wte.weight, model.transformer.wpe.weight],
    )
    x = torch.randint(0, 50257, (2, 16))

    def slow_loader():
        time.sleep(0.02)
        return x, x

    fetch = tel.timed(slow_loader)
    for step in range(2):
        tel.step_started()
        t0 = time.perf_counter()
        a, b = fetch()
        model(a, b)[1].backward()
        time.sleep(0.05)  # what a fast rank does under DDP after its backward: wait for the others
        step_s = time.perf_counter() - t0
        tel.step_ended(step_s)
        assert 0.02 <= tel.busy_s <= step_s - 0.045
        assert tel.due(step) == (step == 1)
    [row] = tel.gather()
    assert row["rank"] == 0 and row["data_ms"] >= 20 and row["step_ms"] >= row["busy_ms"] + 45
    assert (
        row["mem_alloc_gb"] is None and row["temp_c"] is None
    )  # a CPU has neither: null, not a guess
    assert tel.steps == 0  # a new window


def test_the_window_summary_names_the_rank_with_the_most_busy_time_against_the_median_rank():
    ranks = [
        {"rank": r, "host": f"n{r // 2}", "step_ms": 300.0 + r, "busy_ms": b, "data_ms": d}
        for r, (b, d) in enumerate([(200.0, 1.0), (210.0, 2.0), (260.0, 40.0), (205.0, 1.5)])
    ]
    assert window_summary(ranks) == {
        "slowest_rank": 2,
        "slowest_host": "n1",
        "rank_busy_ms_max": 260.0,
        "rank_busy_ms_median": 205.0,
        "rank_step_ms_max": 303.0,
        "data_wait_ms_max": 40.0,
    }
    two = window_summary(ranks[:2])  # of two ranks, the median rank is the other one
    assert two["slowest_rank"] == 1 and two["rank_busy_ms_median"] == 200.0


def _window(step, slowest, busy, median=100.0, host=None):
    return {
        "step": step,
        "loss": 3.0,
        "slowest_rank": slowest,
        "slowest_host": host or f"n{slowest}",
        "rank_busy_ms_max": busy,
        "rank_busy_ms_median": median,
    }


def test_a_straggler_is_the_same_rank_above_the_margin_in_k_windows_in_a_row_and_is_said_once():
    from training.telemetry import StragglerWatch

    watch = StragglerWatch(margin=0.10, windows=3)
    assert (
        watch.feed([_window(49, 5, 120.0), {"step": 50, "loss": 3.0}, _window(99, 5, 125.0)]) == []
    )
    [found] = watch.feed(
        [_window(149, 5, 130.0)]
    )  # the third window in a row (lines between windows don't count)
    assert (found.rank, found.host, found.step, found.windows) == (5, "n5", 149, 3)
    assert found.message == (
        "rank 5 on n5 is a straggler: 130 ms busy per step against the median rank's 100 ms "
        "(+30%) in 3 telemetry windows in a row, up to step 149"
    )
    assert (
        watch.feed([_window(s, 5, 130.0) for s in (199, 249, 299)]) == []
    )  # said once for the stretch


def test_a_rank_within_the_margin_or_another_slowest_rank_starts_the_count_again():
    from training.telemetry import StragglerWatch

    watch = StragglerWatch(margin=0.10, windows=2)
    assert (
        watch.feed([_window(9, 1, 120.0), _window(19, 1, 109.0), _window(29, 1, 120.0)]) == []
    )  # 10%: within
    assert watch.feed([_window(39, 2, 150.0)]) == []  # another rank is the slowest now
    assert (
        watch.feed([_window(49, 2, 150.0, host="elsewhere")]) == []
    )  # rank 2 again, but moved to another host
    [found] = watch.feed([_window(59, 2, 150.0, host="elsewhere")])
    assert (found.rank, found.host) == (2, "elsewhere")
    assert (
        watch.feed([_window(69, 2, 100.0), _window(79, 2, 150.0)]) == []
    )  # recovered, then slow once more
    assert len(watch.feed([_window(89, 2, 150.0)])) == 1  # a new stretch is said again
    assert (
        StragglerWatch(0.10, 1).feed([_window(9, 0, 100.0, median=100.0)]) == []
    )  # one rank: never a straggler
