"""An object store that is down (moto's real S3 server behind a relay that closes every connection,
bench/pausable_relay.py): its calls fail as OSError, which every reader that rides out a store's hiccup
catches, and a long-running process that asked to ride out outages retries them until the store is back."""

import logging
import threading
import time

import fsspec.config
import pytest
import s3fs

from bench.pausable_relay import PausableRelay
from common import store


@pytest.fixture
def relayed(s3_server, monkeypatch):
    """s3:// URLs of this process through a relay in front of the session's moto server."""
    port = int(s3_server["endpoint_url"].rsplit(":", 1)[1])
    relay = PausableRelay(("127.0.0.1", port)).start()
    for k, v in s3_server["env"].items():
        monkeypatch.setenv(k, v)
    monkeypatch.setitem(
        fsspec.config.conf, "s3", {**fsspec.config.conf.get("s3", {}), "endpoint_url": relay.url}
    )
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = s3_server["make_bucket"]("outage")
    store.write_bytes(f"{bucket}/d/x", b"1")
    yield relay, bucket
    relay.stop()
    s3fs.S3FileSystem.clear_instance_cache()


def test_a_store_that_is_down_fails_its_calls_as_an_oserror_naming_the_endpoint(relayed):
    relay, bucket = relayed
    relay.cut(refuse=True)
    for call in (lambda: store.listdir(f"{bucket}/d"), lambda: store.read_bytes(f"{bucket}/d/x")):
        with pytest.raises(store.StoreUnreachable) as err:
            call()
        assert isinstance(err.value, OSError) and relay.url in str(err.value)


def test_a_process_that_rides_out_outages_retries_until_the_store_is_back_and_says_so(relayed):
    relay, bucket = relayed
    said: list[str] = []

    class Heal(
        logging.Handler
    ):  # the store comes back a second after the process has said it is away
        def emit(self, record):
            said.append(record.getMessage())
            if "does not answer" in said[-1]:
                threading.Timer(1.0, relay.heal).start()

    log = logging.getLogger("store")
    handler = Heal(logging.WARNING)
    log.addHandler(handler)
    relay.cut(refuse=True)
    try:
        with store.OutagePatience(60):
            assert store.read_bytes(f"{bucket}/d/x") == b"1"
    finally:
        log.removeHandler(handler)
    assert len(said) == 2, said
    assert said[0].startswith(f"the store {relay.url} does not answer (")
    assert said[0].endswith("calls are retried for up to 60 s")
    assert said[1].startswith(f"the store {relay.url} answers again after ")


def test_patience_has_an_end_and_ends_with_what_asked_for_it(relayed):
    relay, bucket = relayed
    relay.cut(refuse=True)
    t0 = time.monotonic()
    with store.OutagePatience(2), pytest.raises(store.StoreUnreachable):
        store.listdir(f"{bucket}/d")
    assert time.monotonic() - t0 < 30
    # two at once (a process serving two flows): the longest holds until both are stopped
    a, b = store.ride_out_outages(5), store.ride_out_outages(50)
    assert store.patience_s() == 50
    b.stop()
    assert store.patience_s() == 5
    b.stop()  # stopping twice changes nothing
    a.stop()
    assert store.patience_s() == 0
