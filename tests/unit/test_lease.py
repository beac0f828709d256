"""The run directory's writer lease (common/lease.py): two takers at once, one winner. Two real processes on
one run directory: tests/e2e/test_run_dir.py."""

import threading

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
