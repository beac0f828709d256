"""SIGUSR2 / SIGTERM (Slurm's warning before a preemption or the time limit) and SIGINT (Ctrl-C) remembered
instead of ending the process mid-step. The training loop reads it after each step, checkpoints and exits 75;
a signal that came before the first step ends the run at once (75: nothing new to save).

It is installed at the very start of the process (cluster/worker.py does it before importing torch), so a
signal that arrives while a job is still starting up is kept, not lost: torchrun's workers inherit an ignored
SIGUSR2, and a handler installed only after the model is built would miss it. Standard library only.
"""

from __future__ import annotations

import signal

_received: str | None = None
_installed = False


def _handle(signum, frame) -> None:
    global _received
    if (
        signum == signal.SIGINT and _received == "SIGINT"
    ):  # Ctrl-C twice: stop now, without a checkpoint
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise KeyboardInterrupt
    _received = signal.Signals(signum).name


def install() -> None:
    """Catch SIGUSR2, SIGTERM and SIGINT (Ctrl-C) from now on (once per process; later calls keep what was
    caught). A second Ctrl-C stops at once, as Python's own handler would."""
    global _installed
    if not _installed:
        for sig in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _handle)
        _installed = True


def received() -> str | None:
    """The name of the stop signal caught so far, or None."""
    return _received
