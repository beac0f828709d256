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


@pytest.mark.parametrize(
    "manifest",
    [
        "[]",
        "null",
        '"a string"',
        '{"format": "%s", "step": "5", "world_size": 1, "files": {}}',
        '{"format": "%s", "step": 5, "world_size": 1, "files": []}',
        '{"format": "%s", "step": 5, "world_size": 1, "files": {"model.safetensors": "abc"}}',
    ],
)
def test_a_manifest_of_the_wrong_shape_is_one_clear_error(tmp_path, manifest):
    folder = tmp_path / "checkpoints" / "step_000005"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(manifest.replace("%s", ck.FORMAT))
    with pytest.raises(ck.CheckpointError, match="is not a .* manifest"):
        ck.open_checkpoint(str(folder))
    assert ck.latest_checkpoint(str(tmp_path)) is None  # skipped with a warning, not a traceback
