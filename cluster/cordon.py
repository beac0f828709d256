"""The run's cordon list: hosts that failed this run, kept out of its next submissions until they expire.

    {run}/cordon.jsonl    {"host", "reason", "time", "expires"}   one line per cordoning; the latest per host wins

A failure points at a host when a hang's silent ranks all live on it, or when Slurm ends the job NODE_FAIL on a
one-node job. A person can cordon a host by appending a line, or release one with a line whose `expires` has
passed.
"""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

from common import store
from common.layout import RunDir


def cordon(
    run: RunDir, host: str, reason: str, hours: float, now: float | None = None
) -> dict[str, Any]:
    now = time.time() if now is None else now
    rec = {"host": host, "reason": reason, "time": now, "expires": now + hours * 3600}
    store.append_text(run.cordon, json.dumps(rec) + "\n")
    return rec


def cordoned(run: RunDir, now: float | None = None) -> dict[str, dict[str, Any]]:
    """The hosts cordoned now: host -> its latest entry."""
    now = time.time() if now is None else now
    if not store.exists(run.cordon):
        return {}
    latest: dict[str, dict[str, Any]] = {}
    for line in store.read_bytes(run.cordon).decode(errors="replace").splitlines():
        try:
            rec = json.loads(line)
            host, expires = rec["host"], rec.get("expires", 0)
            if not isinstance(host, str) or isinstance(expires, bool):
                continue
            time_, reason = float(rec.get("time", 0)), str(rec.get("reason", ""))
            latest[host] = {**rec, "expires": float(expires), "time": time_, "reason": reason}
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # a torn line, or one a person wrote that is no cordon
    return {h: r for h, r in latest.items() if r["expires"] > now}


def cordon_row(rec: dict[str, Any], step: int | None) -> dict[str, Any]:
    """A cordon as a row of the run's events table in the UI."""
    until = time.strftime("%Y-%m-%d %H:%M", time.localtime(float(rec["expires"])))
    return {
        "time": rec["time"],
        "event": "cordon",
        "step": step,
        "data": rec["host"],
        "reason": f"{rec['reason']} (until {until})",
    }


def host_to_blame(silent: list[str]) -> str | None:
    """The one host all silent ranks (`host:rank` entries) share, if they share one and it is known."""
    hosts = {s.split(":", 1)[0] for s in silent}
    if len(hosts) == 1 and "?" not in hosts:
        return hosts.pop()
    return None


def usable_nodes(partition: str | None, exclude: set[str]) -> list[str] | None:
    """The partition's nodes that are up and not excluded (sinfo), or None when sinfo cannot tell."""
    cmd = ["sinfo", "-h", "-N", "-o", "%N %t", *(["-p", partition] if partition else [])]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    bad = ("down", "drain", "drng", "fail", "maint", "unk", "futr", "inval", "npc")
    nodes = set()
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) != 2 or parts[0] in exclude or parts[1].endswith("*"):  # *: not responding
            continue
        if not parts[1].rstrip("~#!%$@^-").startswith(bad):
            nodes.add(parts[0])
    return sorted(nodes)
