"""Follow a flow run on the console as a story: its own log lines and its subflows' (the data prep, each
submission, the progress, each evaluation, the result), until it ends; the exit status says how it ended.

    python -m flows.follow FLOW_RUN_ID [--timeout S] [--tasks]

`prefect deployment run ... --watch` prints Prefect's events instead: every artifact update, state change and
heartbeat. The task runs' own lines (every training step) are in the UI and in the run directory; `--tasks`
prints them too. Warnings and errors are printed whoever logs them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

import httpx

from common import exit_codes
from common.cli import entry_point
from common.errors import BadInput

POLL_S = 2.0
# Logs reach the server in batches a little after they are written: read on this long after the run ended.
SETTLE_S = 5.0


class Story:
    """The lines of one flow run (and its subflows) not printed yet, in the order they were written."""

    def __init__(self, client: Any, run_id: uuid.UUID, tasks: bool = False):
        self.client, self.run_id, self.tasks = client, run_id, tasks
        self.after: datetime | None = None
        self.seen: set[uuid.UUID] = set()  # the logs at `after`, which the next read returns again
        self.flow_names: dict[uuid.UUID, str] = {}  # subflow run -> its flow's name

    async def _runs(self) -> list[uuid.UUID]:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

        subflows = await self.client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[self.run_id])
            )
        )
        for run in subflows:
            if run.id not in self.flow_names:
                self.flow_names[run.id] = (await self.client.read_flow(run.flow_id)).name
        return [self.run_id, *(r.id for r in subflows)]

    async def new_lines(self) -> list[str]:
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterTimestamp
        from prefect.client.schemas.sorting import LogSort

        ids, lines = await self._runs(), []
        while True:
            page = await self.client.read_logs(
                LogFilter(
                    flow_run_id=LogFilterFlowRunId(any_=ids),
                    timestamp=LogFilterTimestamp(after_=self.after) if self.after else None,
                ),
                limit=200,
                sort=LogSort.TIMESTAMP_ASC,
            )
            fresh = [log for log in page if log.id not in self.seen]
            for log in fresh:
                if log.timestamp != self.after:
                    self.after, self.seen = log.timestamp, set()
                self.seen.add(log.id)
                if self.tasks or log.task_run_id is None or log.level >= logging.WARNING:
                    lines.append(self._line(log))
            if len(page) < 200 or not fresh:
                return lines

    def _line(self, log: Any) -> str:
        when = log.timestamp.astimezone().strftime("%H:%M:%S")
        level = "" if log.level < logging.WARNING else f"{logging.getLevelName(log.level)}: "
        sub = self.flow_names.get(log.flow_run_id)
        return f"{when} {f'[{sub}] ' if sub else ''}{level}{log.message}"


async def follow(
    run_id: uuid.UUID, timeout_s: float | None = None, tasks: bool = False, out: Callable = print
) -> Any:
    """Print the run's story until it ends (or `timeout_s` passes); its last state (None: still running)."""
    from prefect.client.orchestration import get_client

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    async with get_client() as client:
        story, ended = Story(client, run_id, tasks), None
        while True:
            run = await client.read_flow_run(run_id)
            for line in await story.new_lines():
                out(line)
            if run.state is not None and run.state.is_final():
                if ended is None:
                    ended = time.monotonic()
                elif time.monotonic() - ended >= SETTLE_S:
                    return run.state
            elif deadline is not None and time.monotonic() > deadline:
                return None
            await asyncio.sleep(POLL_S)


@entry_point
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m flows.follow", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("flow_run_id", help="the run's id (`prefect deployment run` prints it as UUID)")
    ap.add_argument("--timeout", type=float, default=None, help="stop following after S seconds")
    ap.add_argument("--tasks", action="store_true", help="print the task runs' lines too")
    args = ap.parse_args(argv)
    if args.timeout is not None and not args.timeout > 0:
        raise BadInput(f"--timeout {args.timeout} is no time to follow a run: give seconds above 0")
    try:
        run_id = uuid.UUID(args.flow_run_id)
    except ValueError:
        raise BadInput(f"{args.flow_run_id!r} is not a flow run id (a UUID)") from None
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    from flows.prefect_server import api_problem

    if not PREFECT_API_URL.value():
        raise BadInput("PREFECT_API_URL is not set: point it at the server the run is on")
    problem = api_problem()
    if problem:
        raise BadInput(problem)
    try:
        state = asyncio.run(follow(run_id, args.timeout, args.tasks))
    except ObjectNotFound:
        raise BadInput(f"no flow run {run_id} on {PREFECT_API_URL.value()}") from None
    except httpx.TransportError as err:  # the server went away: the run itself goes on
        print(
            f"error: the Prefect server stopped answering ({err!r}); follow again with the same command",
            file=sys.stderr,
        )
        return exit_codes.FAILED
    if state is None:
        print(f"still running after {args.timeout:.0f} s; follow it again with the same command")
        return exit_codes.FAILED
    print(f"the run ended {state.name}" + (f": {state.message}" if state.message else ""))
    return exit_codes.OK if state.is_completed() else exit_codes.FAILED


if __name__ == "__main__":
    raise SystemExit(main())
