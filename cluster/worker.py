"""What torchrun starts on each rank: `training.train`, plus a record of how the rank ended.

torchrun reports 1 whatever its workers returned, so each rank writes how it ended to $CLUSTER_EXIT_DIR
(cluster/rank_exits.py); the Slurm launcher and the local executor tell "checkpointed" (exit_codes.REQUEUE)
and "diverged" (exit_codes.DIVERGED) from a failure with those records and report the first failing rank's
error.

    python -m cluster.worker --config tiny --set run_dir=...   (same arguments as training.train)
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
import traceback

from cluster import rank_exits
from cluster.failure import Cause, exception_cause
from common import exit_codes
from training import stop_signal


class _Tee(io.TextIOBase):
    """Keeps the tail of stderr (training prints its own errors there) while passing everything through."""

    def __init__(self, stream, keep: int = 4000):
        self.stream, self.keep, self.tail = stream, keep, ""

    def write(self, s: str) -> int:
        self.tail = (self.tail + s)[-self.keep :]
        return self.stream.write(s)

    def flush(self) -> None:
        self.stream.flush()


def _record(code: int, error: str, cause: Cause | None = None) -> None:
    exit_dir = os.environ.get(rank_exits.EXIT_DIR_ENV)
    if not exit_dir:
        return
    from common.heartbeat import host_name  # here: nothing slow before stop_signal.install()

    rank = int(os.environ.get("RANK", "0"))
    rec = rank_exits.RankExit(rank, code, error, time.time(), host_name(), cause)
    rank_exits.write(exit_dir, rec)


def main(argv: list[str]) -> int:
    stop_signal.install()  # first: Slurm's USR2 may come while torch is still being imported
    from training.train import main as train_main

    tee = _Tee(sys.stderr)
    try:
        with contextlib.redirect_stderr(tee):
            code = train_main(argv)
    except SystemExit as e:  # argparse errors
        code = e.code if isinstance(e.code, int) else exit_codes.BAD_INPUT
        _record(code, tee.tail)
        raise
    except BaseException as err:  # its type says whether the device failed (the host is to blame)
        _record(1, traceback.format_exc()[-4000:], exception_cause(err))
        raise
    _record(code, tee.tail if code not in (exit_codes.OK, exit_codes.REQUEUE) else "")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
