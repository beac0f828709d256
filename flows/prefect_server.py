"""The Prefect server a command talks to (PREFECT_API_URL), checked before any work and, when there is none
(Prefect's temporary one), kept quiet. Light on purpose: commands that only read a run import it too."""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request
from typing import Any

from prefect.settings import PREFECT_API_URL


def api_problem() -> str | None:
    """One line when PREFECT_API_URL names a server that does not answer (instead of a traceback mid-run)."""
    url = PREFECT_API_URL.value()
    if not url:
        return None  # Prefect starts a temporary local server itself
    try:
        urllib.request.urlopen(url.rstrip("/") + "/health", timeout=10)
    except OSError as err:
        return (
            f"the Prefect server at {url} does not answer ({err}); start it (prefect server start) "
            f"or unset PREFECT_API_URL"
        )
    return None


def quiet_temporary_server() -> None:
    """Without PREFECT_API_URL, Prefect serves this one run from a temporary server in a process of its own.
    Its background work (telemetry with no network, SQLite's own contention) logs errors with tracebacks that
    say nothing of the run: kept off the console, so that a traceback there always means something. A server
    of one's own (PREFECT_API_URL) keeps its settings."""
    if not PREFECT_API_URL.value():
        os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def run_flow_here(flow_fn: Any, params: Any) -> None:
    """A flow run from a command line: the server checked (BadInput naming it when it does not answer), a
    temporary one kept quiet, the flow run to its end and its result printed as JSON."""
    from common.errors import BadInput

    problem = api_problem()
    if problem:
        raise BadInput(problem)
    quiet_temporary_server()
    result = asyncio.run(flow_fn(params))
    print(json.dumps(result, indent=2, default=str))
