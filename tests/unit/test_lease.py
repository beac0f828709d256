"""The run directory's writer lease (common/lease.py): two takers at once, one winner; a holder on another host
waited for within a bound, and not past a stop; records that are no lease. Two real processes on one run
directory: tests/e2e/test_run_dir.py."""

import json
import threading
import time
from pathlib import Path

import pytest

from common.lease import Lease


def test_lease_acquired_from_two_threads_at_once_has_one_winner(tmp_path):
    url = str(tmp_path / "leases" / "flow.json")
    results, start = {}, threading.Event()

    def take(name):
        start.wait()
        lease = Lease(url, name, identity=name, ttl_s=2, settle_s=0.3)
        lease._record = lambda: {
            **Lease._record(lease),
            "host": f"host-{name}",
        }  # two hosts, no pid shortcut
        try:
            results[name] = lease.acquire()
        except Exception as err:
            results[name] = err

    threads = [threading.Thread(target=take, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    start.set()
    for t in threads:
        t.join()
    winners = [n for n, r in results.items() if isinstance(r, Lease)]
    assert len(winners) == 1, results
    loser = next(r for r in results.values() if not isinstance(r, Lease))
    assert "is in use by" in str(loser)
    results[winners[0]].release()


def _foreign(url, **fields):
    """A lease record written by a holder on another host."""
    rec = {"owner": "trainer", "host": "elsewhere", "pid": 4242, "token": "t", "ttl_s": 60.0}
    rec.update({"renewed": time.time(), **fields})
    Path(url).parent.mkdir(parents=True, exist_ok=True)
    Path(url).write_text(json.dumps(rec))


def test_a_wait_for_a_holder_elsewhere_is_said_bounded_and_ends_on_a_stop(
    tmp_path, monkeypatch, caplog
):
    import common.lease as lease_module
    from common.errors import StopRequested

    url = str(tmp_path / "leases" / "trainer.json")
    # a record no live holder could keep: renewed in the future, with a TTL of thirty years
    _foreign(url, renewed=time.time() + 3600, ttl_s=1e9)
    asked = time.monotonic() + 1.0
    with (
        caplog.at_level("WARNING"),
        pytest.raises(StopRequested, match="stopped by SIGTERM while waiting"),
    ):
        Lease(url, "me", ttl_s=2).acquire(
            should_stop=lambda: "SIGTERM" if time.monotonic() > asked else None
        )
    assert (
        "waiting up to 601 s" in caplog.text
    )  # said, and bounded by MAX_WAIT_S, not by the record's TTL
    monkeypatch.setattr(lease_module, "MAX_WAIT_S", 1.0)
    t0 = time.monotonic()
    Lease(url, "me", ttl_s=1).acquire().release()  # not renewed within the bound: taken over
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize(
    "text",
    [
        '{"pid": "abc", "host": "%s", "renewed": 1}',
        '{"renewed": "yesterday"}',
        "[1, 2]",
        "{not json",
        "null",
    ],
)
def test_a_record_that_is_no_lease_is_taken_over_with_a_word_not_a_traceback(
    tmp_path, caplog, text
):
    import socket

    url = tmp_path / "leases" / "trainer.json"
    url.parent.mkdir(parents=True)
    url.write_text(text.replace("%s", socket.gethostname()))
    with caplog.at_level("WARNING"):
        Lease(str(url), "me", ttl_s=2, settle_s=0.01).acquire().release()
    assert "is not a lease record" in caplog.text


def test_a_holder_that_ended_unreaped_holds_nothing(tmp_path):
    """A killed holder whose parent died with it stays a zombie where nothing reaps it (a container's init): its
    pid still answers a signal, but the lease is free (else a hung job's successor finds the run in use)."""
    import os
    import socket

    from common.process_tree import alive

    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        deadline = time.time() + 10
        while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.time() < deadline
            time.sleep(0.01)
        os.kill(pid, 0)  # still there for a signal
        assert not alive(pid) and alive(os.getpid())
        url = tmp_path / "leases" / "trainer.json"
        url.parent.mkdir()
        rec = {"owner": "trainer", "host": socket.gethostname(), "pid": pid, "renewed": time.time()}
        url.write_text(json.dumps(rec))
        Lease(str(url), "next trainer", settle_s=0).acquire().release()
    finally:
        os.waitpid(pid, 0)
