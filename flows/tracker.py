"""The flow's tracker mirror (tracking/mirror.py) as a process of its own beside the flow: it holds the tracker
credentials and library, and nothing it waits for (a tracker down or slow) can hold up the flow. Its lines go
to the flow's log; at the flow's end it is told how the run ended and gets a bounded time to catch up."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from common import store
from common.layout import RunDir, SweepDir
from flows.params import TrackerParams


class TrackerMirror:
    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        log: logging.Logger | logging.LoggerAdapter,
        kind: str,
    ):
        self.proc, self.log, self.kind = proc, log, kind
        self.finishing = False
        self._reader = asyncio.ensure_future(self._forward())

    @classmethod
    async def start(
        cls,
        t: TrackerParams,
        run: RunDir,
        log,
        credentials: Mapping[str, str],
    ) -> TrackerMirror:
        """The mirror of one run directory (tracking/mirror.py)."""
        cmd = ["tracking.mirror", "--run-dir", run.url]
        if t.sweep:
            cmd += ["--sweep", t.sweep]
        return await cls._spawn(cmd, t, log, credentials)

    @classmethod
    async def start_for_sweep(
        cls, t: TrackerParams, folder: SweepDir, log, credentials: Mapping[str, str]
    ) -> TrackerMirror:
        """The mirror of a sweep: the parent run of its trials (tracking/sweep_mirror.py)."""
        cmd = ["tracking.sweep_mirror", "--sweep-dir", folder.url]
        return await cls._spawn(cmd, t, log, credentials)

    @classmethod
    async def _spawn(
        cls, cmd: list[str], t: TrackerParams, log, credentials: Mapping[str, str]
    ) -> TrackerMirror:
        target = cmd[2]  # the run or sweep folder it mirrors
        cmd = [
            sys.executable,
            "-m",
            *cmd,
            "--tracker",
            t.kind,
            "--project",
            t.project,
            "--follow",
            "--control-stdin",
            "--interval-s",
            str(t.interval_s),
            "--finish-timeout-s",
            str(t.finish_timeout_s),
        ]
        if t.uri:
            cmd += ["--uri", t.uri]
        if t.entity:
            cmd += ["--entity", t.entity]
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **credentials, "PYTHONUNBUFFERED": "1"},
        )
        log.info(
            "%s tracker mirror started (pid %d): every %g s from %s",
            t.kind,
            proc.pid,
            t.interval_s,
            target,
        )
        return cls(proc, log, t.kind)

    async def _forward(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if not line:
                continue
            level = (
                logging.WARNING
                if (
                    "does not answer" in line
                    or line.startswith("error")
                    or "behind" in line
                    or "rollback" in line
                )
                else logging.INFO
            )
            self.log.log(level, "[%s] %s", self.kind, line)
        code = await self.proc.wait()
        if not self.finishing and code != 0:  # said now, not at the flow's end
            self.log.warning(
                "the %s tracker mirror stopped (exit %s, its last lines above): the run goes on "
                "untracked; `python -m tracking.mirror` delivers it later",
                self.kind,
                code,
            )

    async def finish(self, state: str, timeout_s: float) -> None:
        """Tell the mirror how the run ended; it catches up (for at most its finish timeout) and ends."""
        self.finishing = True
        try:
            if self.proc.stdin is not None and not self.proc.stdin.is_closing():
                self.proc.stdin.write(f"finish {state}\n".encode())
                await self.proc.stdin.drain()
                self.proc.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            await asyncio.wait_for(self.proc.wait(), timeout_s)
        except asyncio.TimeoutError:
            self.log.warning(
                "the %s tracker mirror did not end within %g s: stopped; `python -m tracking.mirror` "
                "delivers what it had not",
                self.kind,
                timeout_s,
            )
            self.proc.kill()  # stuck past its own deadline
            await self.proc.wait()
        await asyncio.wait_for(self._reader, 10)
        if self.proc.returncode not in (0, None, -9):
            self.log.warning(
                "the %s tracker mirror ended with exit %s (see its lines above)",
                self.kind,
                self.proc.returncode,
            )


def tracker_record(run: RunDir, kind: str) -> dict[str, Any]:
    """The tracker run mirroring this run, from the mirror's record."""
    try:
        rec = store.read_json(run.tracker(kind))
    except (FileNotFoundError, ValueError):
        return {"tracker": kind, "run_id": None}
    return {
        "tracker": kind,
        "run_id": rec.get("run_id"),
        "link": rec.get("link"),
        "generation": rec.get("generation"),
        "delivered_step": rec.get("delivered", {}).get("step"),
        "outages": rec.get("outages", 0),
        "finished": rec.get("finished"),
    }
