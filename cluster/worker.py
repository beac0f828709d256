"""What torchrun starts on each rank: `training.train`, plus a record of how the rank ended.

torchrun reports 1 whatever its workers returned, so each rank writes {rank, exit_code, error, time} to
$CLUSTER_EXIT_DIR/rank_<RANK>.json; the launcher tells "checkpointed for requeue" (exit_codes.REQUEUE) from a
failure with it and reports the first failing rank's error.

    python -m cluster.worker --config tiny --set run_dir=...   (same arguments as training.train)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
import traceback

from common import exit_codes
from training import stop_signal


class _Tee(io.TextIOBase):
    """Keeps the tail of stderr (training prints its own errors there) while passing everything through."""

    def __init__(self, stream, keep: int = 4000):
        self.stream, self.keep, self.tail = stream, keep, ""

    def write(self, s: str) -> int:
        self.tail = (self.tail + s)[-self.keep:]
        return self.stream.write(s)

    def flush(self) -> None:
        self.stream.flush()


def _record(code: int, error: str) -> None:
    exit_dir = os.environ.get("CLUSTER_EXIT_DIR")
    if not exit_dir:
        return
    from common.heartbeat import host_name  # here: nothing slow before stop_signal.install()

    rank = int(os.environ.get("RANK", "0"))
    os.makedirs(exit_dir, exist_ok=True)
    path = os.path.join(exit_dir, f"rank_{rank:05d}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"rank": rank, "exit_code": code, "error": error, "time": time.time(),
                   "host": host_name()}, f)
    os.replace(path + ".tmp", path)


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
    except BaseException:
        _record(1, traceback.format_exc()[-4000:])
        raise
    _record(code, tee.tail if code not in (exit_codes.OK, exit_codes.REQUEUE) else "")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
