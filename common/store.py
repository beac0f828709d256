"""Reading and writing the store: any fsspec URL (a local path by default, `s3://bucket/prefix` via s3fs).

Writers make a file visible under its final name only when it is complete: on a local disk through a
temporary name and an atomic rename; on object stores a single PUT already is atomic.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import re
import socket
import threading
import time
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from common.errors import BadInput
from common.process_tree import alive

# Every call to an object store has a deadline: a store that accepts connections and never answers ends in an
# error naming its endpoint within about two minutes (2 tries of s3fs, each of 2 botocore attempts of at most
# 10 s to connect and 30 s to read), not in a silent wait. What the user configured (FSSPEC_S3_*) wins.
S3_DEADLINES: dict[str, Any] = {
    "retries": 2,
    "config_kwargs": {"connect_timeout": 10, "read_timeout": 30, "retries": {"max_attempts": 2}},
}


class StoreUnreachable(ConnectionError):
    """A store whose endpoint could not be reached, or dropped the connection: an OSError, as a local disk's
    failures are, so that every reader that rides out a store's hiccup (`except OSError`) rides out this one
    too. (botocore's connection errors are no OSError, its timeouts are.)"""


_S3_REGISTERED = False
log = logging.getLogger("store")

# How long a long-running process (a trainer, a supervisor) waits for an unreachable object store to come back,
# retrying each call, before the call fails: an outage of a few minutes is normal on a cluster, and a job
# replaced in the middle of one meets the same store. One-shot commands keep the call's own deadline (0).
OUTAGE_PATIENCE_S = 600.0
_patiences: list[
    float
] = []  # of the OutagePatience objects started and not stopped, in this process
_patience_lock = threading.Lock()
_outage_since: float | None = None


class OutagePatience:
    """While started, a call to an object store that cannot reach it is retried, in this whole process, for up to
    `seconds` (every few seconds, said once in the log when the outage starts and when it ends) before it fails.
    Several at once (a served process running several flows) keep the longest patience until each is stopped;
    stopping one that is not started does nothing, so `stop()` goes in a `finally`."""

    def __init__(self, seconds: float = OUTAGE_PATIENCE_S):
        self.seconds, self.started = seconds, False

    def start(self) -> OutagePatience:
        with _patience_lock:
            if not self.started:
                _patiences.append(self.seconds)
                self.started = True
        return self

    def stop(self) -> None:
        with _patience_lock:
            if self.started:
                _patiences.remove(self.seconds)
                self.started = False

    def __enter__(self) -> OutagePatience:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ride_out_outages(seconds: float = OUTAGE_PATIENCE_S) -> OutagePatience:
    """An OutagePatience, started: stop it when the long-running part is over."""
    return OutagePatience(seconds).start()


def patience_s() -> float:
    with _patience_lock:
        return max(_patiences, default=0.0)


def outage_seen() -> bool:
    return _outage_since is not None


def outage(err: BaseException | None, endpoint: str) -> None:
    """Said once per outage, when the first call meets it (`err`) and when a call gets through again."""
    global _outage_since
    if err is not None and _outage_since is None:
        _outage_since = time.monotonic()
        log.warning(
            "the store %s does not answer (%s): calls are retried for up to %.0f s",
            endpoint,
            str(err).splitlines()[0] if str(err) else type(err).__name__,
            patience_s(),
        )
    elif err is None and _outage_since is not None:
        log.warning(
            "the store %s answers again after %.0f s", endpoint, time.monotonic() - _outage_since
        )
        _outage_since = None


def _register_s3() -> None:
    """s3:// and s3a:// in this process open common/s3_store.py's filesystem (s3fs, whose failures to reach the
    endpoint are StoreUnreachable, retried while this process rides out outages)."""
    global _S3_REGISTERED
    if not _S3_REGISTERED:
        from common.s3_store import S3

        for protocol in ("s3", "s3a"):
            fsspec.register_implementation(protocol, S3, clobber=True)
        _S3_REGISTERED = True


def fs_and_path(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    if fsspec.utils.get_protocol(str(url)) not in ("s3", "s3a"):
        return fsspec.core.url_to_fs(str(url))
    _register_s3()
    user = fsspec.config.conf.get("s3", {}).get("config_kwargs", {})
    config = {**S3_DEADLINES["config_kwargs"], **user}
    fs, path = fsspec.core.url_to_fs(str(url), config_kwargs=config)
    fs.retries = S3_DEADLINES["retries"]  # s3fs's own tries (a class attribute, 5 by default)
    return fs, path


def join(url: str, *parts: str) -> str:
    """`url`/part/...: every path the project writes under a run directory or a store is built here, so a name
    (a run's, a task's, a file's) that would lead out of `url` (an absolute path, a `..`) is refused here."""
    for part in parts:
        if part.startswith("/") or ".." in part.split("/"):
            raise PathEscape(f"{part!r} would lead out of {url}: a name inside it is wanted")
    return posixpath.join(str(url).rstrip("/"), *parts)


class PathEscape(BadInput, ValueError):
    """A name that would put a file outside the folder it belongs in."""


def is_local(url: str) -> bool:
    return isinstance(fs_and_path(url)[0], LocalFileSystem)


def sha256(data: bytes) -> str:
    """The hex digest manifests record for every file they list."""
    return hashlib.sha256(data).hexdigest()


def write_bytes(url: str, data: bytes) -> None:
    fs, path = fs_and_path(url)
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)
        return
    parent = os.path.dirname(path)
    # the writer's pid and host in the name: a restart tells a killed writer's file from a live one's at once
    owner = f"{os.getpid()}@{socket.gethostname()}"
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.{owner}.tmp")
    try:
        os.makedirs(parent, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (
        OSError
    ) as err:  # a full disk, a file where a folder should be, no permission: nothing half-written
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise StoreError(f"cannot write {url}: {err.strerror or err}") from None


# write_bytes's temporary names: .{name}.{hex}.{pid}@{host}.tmp (.{name}.{hex}.tmp: earlier versions')
_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]+(?:\.(?P<pid>\d+)@(?P<host>[^/]+))?\.tmp$")


def is_temporary(name: str) -> bool:
    return bool(_TEMPORARY.match(name))


def remove_stale_temporaries(url: str, idle_s: float = 60.0) -> list[str]:
    """Delete the temporary files killed writers left under `url`: at once when the writer was a process of
    this host that is gone, else once untouched for `idle_s` (a live writer elsewhere keeps its file's mtime
    fresh). Local stores only: object stores never show a partial object."""
    fs, path = fs_and_path(url)
    if not isinstance(fs, LocalFileSystem) or not os.path.isdir(path):
        return []
    removed, now, host = [], time.time(), socket.gethostname()
    for root, _, files in os.walk(path):
        for name in files:
            m = _TEMPORARY.match(name)
            if m is None:
                continue
            full = os.path.join(root, name)
            with contextlib.suppress(OSError):
                dead = m["host"] == host and not alive(int(m["pid"]))
                if dead or now - os.stat(full).st_mtime > idle_s:
                    os.remove(full)
                    removed.append(full)
    return removed


def read_bytes(url: str) -> bytes:
    fs, path = fs_and_path(url)
    return fs.cat_file(path)


def write_json(url: str, obj: Any) -> None:
    write_bytes(url, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


def read_jsonl(url: str) -> list[dict[str, Any]]:
    """The records of an append-only JSON-lines file, oldest first; none when it does not exist yet. A line torn
    by a killed writer, or one that is no object, is left out."""
    try:
        text = read_bytes(url).decode(errors="replace")
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def exists(url: str) -> bool:
    fs, path = fs_and_path(url)
    return fs.exists(path)


def listdir(url: str) -> list[str]:
    """Base names directly under `url` (empty when it does not exist)."""
    fs, path = fs_and_path(url)
    try:
        entries = (
            fs.ls(path, detail=False, refresh=True)
            if not isinstance(fs, LocalFileSystem)
            else fs.ls(path, detail=False)
        )
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(e.rstrip("/")) for e in entries)


def append_text(url: str, text: str) -> None:
    """Append to a log-like file. Local files append in place; object stores have no append, so those
    rewrite the object (callers batch lines to keep that cheap)."""
    fs, path = fs_and_path(url)
    if isinstance(fs, LocalFileSystem):
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "a") as f:
                f.write(text)
        except OSError as err:
            raise StoreError(f"cannot append to {url}: {err.strerror or err}") from None
    else:
        old = fs.cat_file(path) if fs.exists(path) else b""
        fs.pipe_file(path, old + text.encode())


def move(src: str, dst: str) -> None:
    """Move a file or folder within one store (a rename on a local disk; copy, then delete, on object stores)."""
    fs, src_path = fs_and_path(src)
    dst_path = fs_and_path(dst)[1]
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(dst_path), exist_ok=True)
        os.rename(src_path, dst_path)
    else:
        fs.mv(src_path, dst_path, recursive=True)


def remove_tree(url: str) -> None:
    fs, path = fs_and_path(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


class StoreError(BadInput):
    """The store cannot be used (no credentials, no bucket, no permission, unreachable); names the URL."""


def preflight(url: str, write: bool) -> None:
    """Fail early and clearly if `url` cannot be read (or written): before a model is built or a job queued."""
    try:
        fs, path = fs_and_path(url)
        if write:
            probe = join(url, f".preflight-{uuid.uuid4().hex}")
            write_bytes(probe, b"ok")
            fs.rm(fs_and_path(probe)[1])
        else:
            fs.ls(path)
    except FileNotFoundError:
        if write:
            raise StoreError(
                f"cannot write under {url}: the bucket or parent does not exist"
            ) from None
        # a missing path is reported by the caller, which knows what it expected to find there
    except (
        Exception
    ) as err:  # botocore/aiohttp/permission errors differ by backend; the message is what matters
        name = type(err).__name__
        hint = ""
        if "Credentials" in name or "credential" in str(err).lower():
            hint = (
                " (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role)"
            )
        raise StoreError(
            f"cannot {'write to' if write else 'read'} {url}: {name}: {err}{hint}"
        ) from None
