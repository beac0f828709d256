"""One writer per run directory: a lease file its holder keeps renewing, on a local path or on object storage.

    {run}/leases/{role}.json    {"owner", "host", "pid", "id", "token", "renewed", "ttl_s"}

A second trainer (or a second flow run) on the same run directory stops at start with a message naming the
first, instead of both writing into it. A lease is free when there is none, when it was left by this same
identity (a requeue of the same Slurm job, a retry of the same flow run), when its holder's process is gone
(same host), or when it has not been renewed for `ttl_s` (a holder that died on another host). Taking it is
write, wait, read back: two takers racing see who won; the loser stops. The holder renews it from a thread
every `ttl_s / 4`; should it ever find another holder's token there, `lost` is set and the holder must stop
writing.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from common import store
from common.errors import BadInput, StopRequested
from common.process_tree import alive

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 60.0


MAX_WAIT_S = 600.0  # the longest wait for a holder on another host to show it lives


class LeaseHeld(BadInput):
    """Another live writer holds the run directory; the message names it."""


def _malformed(rec: Any) -> str | None:
    """What makes `rec` no lease record, or None."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    kinds = {"owner": str, "host": str, "pid": int, "id": str, "token": str}
    for name, kind in kinds.items():
        if name in rec and (isinstance(rec[name], bool) or not isinstance(rec[name], kind)):
            return f"{name!r} is {rec[name]!r}"
    for name in ("renewed", "ttl_s"):
        value = rec.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            return f"{name!r} is {value!r}"
    return None


class Lease:
    def __init__(
        self,
        url: str,
        owner: str,
        identity: str = "",
        ttl_s: float = DEFAULT_TTL_S,
        settle_s: float = 0.5,
    ):
        """`owner`: how the holder is named to others ("trainer, Slurm job 1234"); `identity`: what makes a
        later holder the same one (the Slurm job id, the flow run id), empty for none."""
        self.url, self.owner, self.identity, self.ttl_s, self.settle_s = (
            url,
            owner,
            identity,
            ttl_s,
            settle_s,
        )
        self.token = uuid.uuid4().hex
        self.lost = threading.Event()
        self.lost_to: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "id": self.identity,
            "token": self.token,
            "renewed": time.time(),
            "ttl_s": self.ttl_s,
        }

    def _read(self) -> dict[str, Any] | None:
        """The lease record; {} for one that is not a lease record (unreadable JSON, or a field of the wrong
        kind: treated as a lease nobody renews, and said); None when there is none."""
        try:
            rec = store.read_json(self.url)
        except FileNotFoundError:
            return None
        except ValueError:
            rec = None
        problem = _malformed(rec)
        if problem:
            log.warning(
                "%s is not a lease record (%s): treated as a lease nobody holds", self.url, problem
            )
            return {}
        return rec

    @staticmethod
    def describe(rec: dict[str, Any]) -> str:
        """The holder as others read it; `rec` as `_read` returns it (its fields of the right kinds)."""
        age = time.time() - float(rec.get("renewed", 0))
        return f"{rec.get('owner', '?')} on {rec.get('host', '?')} (pid {rec.get('pid', '?')}, renewed {age:.0f} s ago)"

    def _state(self, rec: dict[str, Any]) -> str:
        """ "free", "held", or "unknown" (a holder on another host, renewed less than ttl_s ago)."""
        if not rec or (self.identity and rec.get("id") == self.identity):
            return "free"
        if (
            rec.get("host") == socket.gethostname()
        ):  # on this host we know whether its holder is alive
            return "held" if alive(int(rec.get("pid", 0))) else "free"
        return (
            "free"
            if time.time() - float(rec.get("renewed", 0)) > float(rec.get("ttl_s", self.ttl_s))
            else "unknown"
        )

    def _held(self, rec: dict[str, Any]) -> LeaseHeld:
        return LeaseHeld(
            f"{run_of(self.url)} is in use by {self.describe(rec)}; one writer per run directory: "
            "wait for it to end, stop it, or use another run"
        )

    def acquire(self, should_stop: Callable[[], str | None] = lambda: None) -> Lease:
        """Take the lease, or raise LeaseHeld naming its holder. `should_stop`: a stop asked for while this waits
        for a holder on another host (the name of the signal), which ends the wait with StopRequested."""
        rec = self._read()
        state = "free" if rec is None else self._state(rec)
        if rec is not None and state == "held":
            raise self._held(rec)
        if rec is not None and state == "unknown":
            self._wait_for_holder(rec, should_stop)
        elif rec:
            log.info("taking over the lease of %s", self.describe(rec))
        store.write_json(self.url, self._record())
        time.sleep(
            self.settle_s
        )  # another taker that read the same state writes within this window
        now = self._read()
        if not now or now.get("token") != self.token:
            raise self._held(now or {})
        self._thread = threading.Thread(target=self._renew, name="lease-renewal", daemon=True)
        self._thread.start()
        return self

    def _wait_for_holder(self, rec: dict[str, Any], should_stop: Callable[[], str | None]) -> None:
        """A holder on another host, renewed lately: wait for a renewal (it lives: LeaseHeld) or for the lease to
        go stale (it died). The wait is said, bounded by the longer of the two TTLs up to MAX_WAIT_S (a record
        may claim any TTL, or a renewal in the future), and ends on a stop signal."""
        wait_s = min(max(float(rec.get("ttl_s", self.ttl_s)), self.ttl_s), MAX_WAIT_S) + 1
        log.warning(
            "%s is held by %s: waiting up to %.0f s for it to be renewed (a live holder) or not (a dead one)",
            run_of(self.url),
            self.describe(rec),
            wait_s,
        )
        seen, deadline = rec.get("renewed"), time.monotonic() + wait_s
        while time.monotonic() < deadline:
            time.sleep(min(1.0, self.ttl_s / 8))
            stop = should_stop()
            if stop:
                raise StopRequested(
                    f"stopped by {stop} while waiting for the lease of {run_of(self.url)} "
                    f"(held by {self.describe(rec)})"
                )
            now = self._read()
            if now is None:
                return
            if now.get("renewed") != seen:
                raise self._held(now)
        log.warning("taking over the stale lease of %s", self.describe(rec))

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                rec = self._read()
                if rec and rec.get("token") not in (None, self.token):
                    self.lost_to = self.describe(rec)
                    self.lost.set()
                    log.error("lease lost to %s", self.lost_to)
                    return
                store.write_json(self.url, self._record())
            except (
                Exception
            ) as err:  # a store hiccup: the next renewal tries again, well within the TTL
                log.warning("could not renew the lease %s: %s", self.url, err)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self.lost.is_set():
            return
        try:
            rec = self._read()
            if rec and rec.get("token") == self.token:
                store.remove_tree(self.url)
        except Exception as err:  # the lease expires by itself
            log.warning("could not release the lease %s: %s", self.url, err)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def run_of(url: str) -> str:
    """The run directory of a lease URL ({run}/leases/{role}.json)."""
    return url.rsplit("/", 2)[0]
