"""A process and everything it started, found through /proc: torchrun starts each rank in a session of its own,
so signalling torchrun's process group misses the ranks, and once torchrun is gone they are orphans no one
tracks (a frozen rank would then hold its run directory's lease for good)."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def descendants(root: int) -> list[int]:
    """The children of `root`, their children, and so on (Linux /proc), parents before children."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue  # gone meanwhile
        ppid = int(
            stat.rsplit(")", 1)[1].split()[1]
        )  # after the command name, which may hold spaces
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(0), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(root: int, sig: signal.Signals = signal.SIGKILL) -> list[int]:
    """`sig` to `root`'s process group and to every descendant (each found before any is signalled, so none
    is orphaned out of reach first); the pids signalled."""
    pids = descendants(root)
    for pid in [root, *pids]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    try:
        os.killpg(root, sig)
    except (ProcessLookupError, PermissionError):
        pass
    return [root, *pids]


def alive(pid: int) -> bool:
    """Whether a process of that pid runs on this host (one of another user's counts). A zombie does not: it
    has ended, and whether it is reaped is up to its parent (or an init that never reaps, in a container)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False  # it ended just now
    except OSError:
        return True  # no /proc to read: the signal's answer stands
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"
