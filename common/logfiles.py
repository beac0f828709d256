"""Files of a run directory that only grow by whole lines (metrics.jsonl, telemetry.jsonl, samples.jsonl,
events.jsonl), written so that the training step never waits on the store.

Local run directories get each line appended at once. Object stores have no append: there every file is kept
in memory and rewritten whole, by one thread for all of a process's files, each time with every line given so
far: at most every `flush_seconds` (only the files with new lines), and at every flush() (a checkpoint, the
end of the run), which returns once every file holds every line given before it was called.

`LogTail` reads them back as they grow: only the bytes added since its last read.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from common import store

log = logging.getLogger(__name__)


class LogFile:
    """One file of a LogFiles; `append` takes one or more whole lines, each ending in a newline."""

    def __init__(self, owner: LogFiles, url: str, lines: list[str], local: bool):
        self.url, self.local, self._owner = url, local, owner
        self.lines = lines  # the file's content, line by line (object stores only)
        self.version = self.written = 0  # appends so far; those the store holds

    def append(self, text: str) -> None:
        if self.local:
            store.append_text(self.url, text)
            return
        with self._owner.lock:
            self.lines.append(text)
            self.version += 1
        self._owner.appended()


class LogFiles:
    """The growing files of one process, and the thread that writes them to an object store."""

    def __init__(self, flush_seconds: float = 30.0):
        self.flush_seconds = flush_seconds
        self.lock = threading.Lock()  # the files' lines
        self._write_lock = (
            threading.Lock()
        )  # one rewrite at a time, so an older content never lands last
        self._files: list[LogFile] = []
        self._due = threading.Event()
        self._last = time.monotonic()
        self._thread: threading.Thread | None = None

    def open(
        self, url: str, keep: Callable[[str], bool] | None = None, create: bool = False
    ) -> LogFile:
        """The file at `url`, with the lines it holds that `keep` accepts (all without it: e.g. not the steps a
        resumed run is about to redo); rewritten at once when some were dropped, or created when `create`."""
        local = store.is_local(url)
        exists = store.exists(url)
        old = (
            store.read_bytes(url).decode(errors="replace").splitlines()
            if exists and (keep or not local)
            else []
        )
        lines = [x + "\n" for x in old if keep is None or keep(x)]
        if len(lines) < len(old) or (create and not exists):
            store.write_bytes(url, "".join(lines).encode())
        f = LogFile(self, url, lines if not local else [], local)
        if not local:
            with self.lock:
                self._files.append(f)
            if self._thread is None:
                self._thread = threading.Thread(target=self._writer, name="log-writer", daemon=True)
                self._thread.start()
        return f

    def appended(self) -> None:
        if time.monotonic() - self._last > self.flush_seconds:
            self._last = time.monotonic()
            self._due.set()

    def flush(self) -> None:
        """Every file holds every line appended so far when this returns (a failed write raises)."""
        self._rewrite()
        self._last = time.monotonic()

    def _rewrite(self) -> None:
        with self._write_lock:
            with self.lock:
                files = list(self._files)
            for f in files:
                with self.lock:
                    if f.version == f.written:
                        continue
                    data, version = "".join(f.lines).encode(), f.version
                store.write_bytes(f.url, data)
                f.written = version

    def _writer(self) -> None:
        while True:
            self._due.wait()
            self._due.clear()
            try:
                self._rewrite()
            except (
                Exception
            ) as err:  # a store hiccup: the next rewrite or flush() carries these lines too
                log.warning("could not rewrite a log file of the run: %s", err)


class LogTail:
    """New whole lines of a growing file since the last call."""

    def __init__(self, url: str):
        self.url, self.offset = url, 0

    def read(self) -> list[str]:
        fs, path = store.fs_and_path(self.url)
        try:
            fs.invalidate_cache(path)
            size = fs.size(path)
            if size < self.offset:  # truncated (a requeued Slurm job reopened its log)
                self.offset = 0
            if size == self.offset:
                return []
            with fs.open(path, "rb") as f:
                f.seek(self.offset)
                data = f.read(size - self.offset)
        except (FileNotFoundError, OSError):
            return []
        end = data.rfind(b"\n") + 1  # whole lines only: a torn last line is read next time
        self.offset += end
        return data[:end].decode(errors="replace").splitlines()
