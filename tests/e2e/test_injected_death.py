"""The injected death (training/faults.py, `debug.die_at_step`): a real SIGKILL of a real process, which lets a
checkpoint still being written land first, and fires once per run directory."""

import signal
import subprocess
import sys
import textwrap

from common.layout import RunDir
from training.config import DebugConfig
from training.faults import Death

_CHILD = textwrap.dedent(
    """
    import sys, time
    from common.layout import RunDir
    from training.config import DebugConfig
    from training.faults import Death

    run, landed = RunDir(sys.argv[1]), sys.argv[2]

    def settle():  # a checkpoint write still in flight: it takes a while, and lands
        time.sleep(0.3)
        open(landed, "w").write("landed")

    death = Death(DebugConfig(die_at_step=2), run, is_master=True)
    for step in range(5):
        death.at(step, settle=settle)
        print(step, flush=True)
    """
)


def _run(run: str, landed: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _CHILD, run, landed], capture_output=True, text=True, timeout=60
    )


def test_the_process_dies_at_its_step_after_the_write_in_flight_and_only_once(tmp_path):
    run, landed = str(tmp_path / "run"), tmp_path / "landed"
    first = _run(run, str(landed))
    assert first.returncode == -signal.SIGKILL
    assert first.stdout.split() == ["0", "1"]  # no step 2: it died there
    assert landed.read_text() == "landed"  # not killed in the middle of the write
    assert "killed at step 2" in first.stderr

    landed.unlink()
    again = _run(run, str(landed))  # the resubmission on the same run directory goes past it
    assert again.returncode == 0 and again.stdout.split() == ["0", "1", "2", "3", "4"]
    assert not landed.exists()  # nothing waited for: no death due


def test_no_death_configured_is_no_death(tmp_path):
    death = Death(DebugConfig(), RunDir(str(tmp_path)), is_master=True)
    for step in range(3):
        death.at(step, settle=lambda: (_ for _ in ()).throw(AssertionError("settled")))
