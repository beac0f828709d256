"""The data-prep job array refuses what it cannot run before anything is submitted. The array on the real
local cluster: tests/e2e/test_prep_array.py."""

import pytest

from cluster.prep_array import submit_prep
from cluster.spec import JobSpec
from data_prep.sources import SourceError


def test_job_array_rejects_a_hub_source_and_a_missing_folder_before_sbatch(tmp_path):
    with pytest.raises(SourceError, match="needs source files"):
        submit_prep(
            "hf:HuggingFaceFW/fineweb-edu:sample-10BT",
            str(tmp_path / "out"),
            JobSpec(folder=str(tmp_path / "s")),
        )
    with pytest.raises(SourceError):
        submit_prep(
            str(tmp_path / "nothing-here"),
            str(tmp_path / "out"),
            JobSpec(folder=str(tmp_path / "s")),
        )
    assert not (tmp_path / "s").exists()  # nothing was submitted
