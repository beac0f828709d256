"""What every command shares (common/cli.py): one-line errors with their exit code, and flags derived from the
typed models, so a field of JobSpec or PretrainParams is a flag of every command that takes one."""

import subprocess
import sys

from helpers import REPO


def test_a_bad_flag_value_is_one_line_before_anything_is_submitted(tmp_path):
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.submit",
            "--config",
            "tiny",
            "--nodes",
            "0",
            "--folder",
            str(tmp_path / "slurm"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "nodes: Input should be greater than or equal to 1" in p.stderr, (
        p.stderr
    )
    assert "Traceback" not in p.stderr and not (tmp_path / "slurm").exists()
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.submit",
            "--config",
            "tiny",
            "--spec",
            str(tmp_path / "no.json"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "cannot read --spec" in p.stderr and "Traceback" not in p.stderr
