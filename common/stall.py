"""A watcher's alarm for its own waits: every external call has a deadline (common/store.py, the Slurm commands),
but a deadline of minutes is minutes of silence. `StallAlarm` says, from its own thread, when the watcher has
waited on one call for longer than `after_s`, and again when the call returns, so that a store or a scheduler
that stopped answering is in the run's log while it lasts, not only after it.

    alarm = StallAlarm(log.warning)
    with alarm.waiting_on("the store (s3://bucket/runs/x)"):
        read_heartbeats(...)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class StallAlarm:
    def __init__(self, say: Callable[[str], None], after_s: float = 30.0, tick_s: float = 1.0):
        self.say, self.after_s, self.tick_s = say, after_s, tick_s
        self._lock = threading.Lock()
        self._what: str | None = None
        self._since = 0.0
        self._said = False
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @contextmanager
    def waiting_on(self, what: str) -> Iterator[None]:
        """Around one call (or a few on the same service); not re-entrant."""
        self._ensure_thread()
        with self._lock:
            self._what, self._since, self._said = what, time.monotonic(), False
        try:
            yield
        finally:
            with self._lock:
                said, waited = self._said, time.monotonic() - self._since
                self._what, self._said = None, False
            if said:
                self.say(f"{what} answered after {waited:.0f} s")

    def close(self) -> None:
        self._stop.set()

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="stall-alarm", daemon=True)
            self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(self.tick_s):
            with self._lock:
                what, waited = self._what, time.monotonic() - self._since
                due = what is not None and not self._said and waited > self.after_s
                if due:
                    self._said = True
            if due:
                self.say(
                    f"{what} has not answered for {waited:.0f} s: still waiting (its deadline ends the wait)"
                )
