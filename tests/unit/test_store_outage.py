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
    store.ride_out_outages(0)
    s3fs.S3FileSystem.clear_instance_cache()


def test_a_store_that_is_down_fails_its_calls_as_an_oserror_naming_the_endpoint(relayed):
    relay, bucket = relayed
    relay.cut(refuse=True)
    for call in (lambda: store.listdir(f"{bucket}/d"), lambda: store.read_bytes(f"{bucket}/d/x")):
        with pytest.raises(store.StoreUnreachable) as err:
            call()
        assert isinstance(err.value, OSError) and relay.url in str(err.value)


def test_a_process_that_rides_out_outages_retries_until_the_store_is_back_and_says_so(
    relayed, caplog
):
    relay, bucket = relayed
    store.ride_out_outages(60)
    relay.cut(refuse=True)
    threading.Timer(3.0, relay.heal).start()
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="store"):
        assert store.read_bytes(f"{bucket}/d/x") == b"1"
    assert time.monotonic() - t0 >= 3.0
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2, said
    assert said[0].startswith(f"the store {relay.url} does not answer (")
    assert said[0].endswith("calls are retried for up to 60 s")
    assert said[1].startswith(f"the store {relay.url} answers again after ")


def test_patience_has_an_end(relayed):
    relay, bucket = relayed
    store.ride_out_outages(2)
    relay.cut(refuse=True)
    t0 = time.monotonic()
    with pytest.raises(store.StoreUnreachable):
        store.listdir(f"{bucket}/d")
    assert time.monotonic() - t0 < 30
