"""How a job ended, read from its ranks' exit records (cluster/rank_exits.py): the one reading every executor
uses, since torchrun exits 1 whatever a failing rank's code was."""

import json

import pytest

from cluster import rank_exits
from cluster.rank_exits import RankExit, job_end


def _rec(rank, code, t=0.0, error=""):
    return RankExit(rank, code, error, t, f"h{rank}")


@pytest.mark.parametrize(
    "codes, launcher, state",
    [
        ([0, 0], 0, "completed"),
        ([75, 75], 1, "stopped"),
        (
            [0, 75],
            1,
            "stopped",
        ),  # one rank stopped after the last step's checkpoint, the other with it
        ([3, 3], 1, "diverged"),
        (
            [3, 0],
            1,
            "failed",
        ),  # the guard decides alike on every rank: a split verdict is a bug, not a divergence
        ([75], 1, "failed"),  # rank 1 left no record: it did not stop with the others
        ([1, 75], 1, "failed"),
    ],
)
def test_how_a_job_ended_follows_from_its_ranks_records(codes, launcher, state):
    assert job_end([_rec(r, c) for r, c in enumerate(codes)], range(2), launcher).state == state


def test_a_failure_names_the_rank_that_failed_first_and_the_ranks_that_left_no_record():
    end = job_end(
        [
            _rec(0, 1, t=5.0, error="Traceback ...\nRuntimeError: peer gone\n"),
            _rec(2, 1, t=3.0, error="Traceback ...\nValueError: bad shard\n"),
        ],
        range(3),
        1,
    )
    assert end.state == "failed" and end.first_failure.rank == 2 and end.silent == (1,)
    assert end.reason(1) == (
        "rank 1 ended without a record (killed: a signal, out of memory?); "
        "rank 2 on h2 failed first (exit 1): ValueError: bad shard"
    )
    assert (
        job_end([], range(2), -9).reason(-9)
        == "ranks 0, 1 ended without a record (killed: a signal, out of memory?)"
    )


def test_one_nodes_share_of_a_job_is_read_from_its_own_ranks():
    records = [_rec(0, 75), _rec(1, 75), _rec(2, 1), _rec(3, 1)]
    assert job_end(records, range(0, 2), 1).state == "stopped"
    assert job_end(records, range(2, 4), 1).state == "failed"


def test_records_round_trip_and_a_record_that_is_not_one_counts_as_missing(tmp_path):
    rank_exits.write(str(tmp_path), _rec(0, 75))
    rank_exits.write(str(tmp_path), _rec(1, 3, error="x"))
    for bad, name in (
        (b"[1, 2]", 2),
        (b'{"rank": "3"}', 3),
        (b"not json", 4),
        (b'{"rank": true, "exit_code": 0, "error": "", "time": 0, "host": "h"}', 5),
    ):
        (tmp_path / f"rank_{name:05d}.json").write_bytes(bad)
    assert rank_exits.read(str(tmp_path)) == [_rec(0, 75), _rec(1, 3, error="x")]
    assert (
        job_end(rank_exits.read(str(tmp_path)), range(2), 1).state == "failed"
    )  # 75 and 3: not alike
    assert not list(tmp_path.glob("*.tmp"))
    assert json.loads((tmp_path / "rank_00000.json").read_text())["exit_code"] == 75
