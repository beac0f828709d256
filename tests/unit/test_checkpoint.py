"""A folder that is not a checkpoint is one clear error. Writing, resuming and verifying checkpoints:
tests/e2e/test_checkpoint.py."""

import json

import pytest

from training import checkpoint as ck


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ck.CheckpointError, match="neither a checkpoint"):
        ck.resolve(str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ck.CheckpointError, match="no valid checkpoint"):
        ck.resolve(str(tmp_path))
    bad = tmp_path / "checkpoints/step_000001"
    bad.mkdir()
    (bad / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ck.CheckpointError, match="not a"):
        ck.open_checkpoint(str(bad))
