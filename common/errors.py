"""The project's error classes share one base, so every CLI reports them the same way: one line on stderr,
and the exit code the class names (common/exit_codes.py). Anything else is a bug and keeps its traceback."""

from __future__ import annotations

from common import exit_codes


class ReproError(Exception):
    """A failure the project explains in its message; the CLIs print it without a traceback."""

    exit_code = exit_codes.FAILED


class StopRequested(ReproError):
    """A stop signal (preemption, Ctrl-C) came while a command waited, before it had anything to save: it
    stops with the requeue code (run it again to go on)."""

    exit_code = exit_codes.REQUEUE


class BadInput(ReproError):
    """The user's input cannot work (config, data, paths, credentials); raised before work starts."""

    exit_code = exit_codes.BAD_INPUT


def last_line(text: str) -> str:
    """The last non-empty line of an error's text: after a traceback, the exception's own message."""
    return next((ln.strip() for ln in reversed(text.splitlines()) if ln.strip()), "")
