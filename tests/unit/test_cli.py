"""What every command shares (common/cli.py): one-line errors with their exit code, and flags derived from the
typed models, so a field of JobSpec or PretrainParams is a flag of every command that takes one."""

import argparse

import pytest

from cluster.spec import JobSpec
from common import exit_codes
from common.cli import add_model_flags, entry_point, model_from_flags
from common.errors import BadInput, ReproError
from flows.params import PretrainParams, add_flags, from_flags


def test_project_errors_are_one_line_with_their_exit_code(capsys):
    @entry_point
    def bad(argv=None):
        raise BadInput("data URL 'x' has no shards")

    @entry_point
    def failed(argv=None):
        raise ReproError("job 7 ended FAILED")

    @entry_point
    def bug(argv=None):
        raise KeyError("a bug keeps its traceback")

    assert bad([]) == exit_codes.BAD_INPUT == 2
    assert capsys.readouterr().err == "error: data URL 'x' has no shards\n"
    assert failed([]) == exit_codes.FAILED == 1
    with pytest.raises(KeyError):
        bug([])


def test_a_call_past_its_deadline_is_one_line_naming_what_did_not_answer(capsys):
    class ReadTimeoutError(
        Exception
    ):  # botocore's, by name: the CLIs need not import every client library
        pass

    @entry_point
    def waited(argv=None):
        try:
            raise ReadTimeoutError('Read timeout on endpoint URL: "http://10.0.0.9:9000/bucket"')
        except ReadTimeoutError as err:
            raise RuntimeError("while listing the shards") from err

    assert waited([]) == exit_codes.FAILED
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and 'Read timeout on endpoint URL: "http://10.0.0.9:9000/bucket"' in err
    )


def _parse(model, argv, **kw):
    ap = argparse.ArgumentParser()
    add_model_flags(ap, model, **kw)
    return model_from_flags(model, ap.parse_args(argv), kw.get("base"))


def test_job_spec_flags_come_from_its_fields():
    spec = _parse(
        JobSpec,
        [
            "--nodes",
            "2",
            "--gpus-per-node",
            "8",
            "--time",
            "30",
            "--exclusive",
            "--qos",
            "high",
            "--sbatch-extra=--reservation=big",
            "--setup",
            "module load cuda",
            "--no-gres",
            "--gpu-mem-gb",
            "80",
        ],
        aliases={"time_min": ["--time"]},
    )
    assert (
        spec.nodes,
        spec.gpus_per_node,
        spec.time_min,
        spec.exclusive,
        spec.qos,
        spec.gres,
        spec.gpu_mem_gb,
    ) == (2, 8, 30, True, "high", False, 80.0)
    assert spec.sbatch_extra == ["--reservation=big"] and spec.setup == ["module load cuda"]
    assert _parse(JobSpec, []) == JobSpec()  # flags not given keep the model's defaults
    with pytest.raises(
        BadInput, match=r"nodes: Input should be greater than or equal to 1 \(got '0'\)"
    ):
        _parse(JobSpec, ["--nodes", "0"])


def test_flow_parameters_flags_and_a_json_base():
    ap = argparse.ArgumentParser()
    add_flags(ap)
    args = ap.parse_args(
        [
            "--run-name",
            "x",
            "--set",
            "max_steps=5",
            "--set",
            "sample_prompt=a, b",
            "--eval-tasks",
            "",
            "--hang-floor-s",
            "60",
            "--tracker",
            "tensorboard",
        ]
    )
    base = {"run_name": "from-json", "executor": "slurm", "hang": {"floor_s": 5, "factor": 3}}
    p = from_flags(args, base)
    # flags win over the JSON base, a section's flag over its section's value there
    assert (p.run_name, p.executor, p.evaluation.tasks) == ("x", "slurm", [])
    assert (p.hang.floor_s, p.hang.factor, p.tracker.kind) == (60, 3, "tensorboard")
    assert p.overrides == ["max_steps=5", "sample_prompt=a, b"]
    args = ap.parse_args(["--eval-tasks", "hellaswag,arc_easy"])
    assert from_flags(args).evaluation.tasks == ["hellaswag", "arc_easy"]
    # the store itself, its parent, a path, a line break
    for name in (".", "..", "a/b", "a\nb", ""):
        with pytest.raises(ValueError, match="run_name"):
            PretrainParams(run_name=name)
    for field in ("store", "data", "prepare_source", "hellaswag_data", "tracker_uri"):
        with pytest.raises(ValueError, match="carries a password in its URL") as err:
            PretrainParams(**{field: "https://alice:s3cr3t@host/x"})
        assert "s3cr3t" not in str(err.value)  # refused without being repeated
    PretrainParams(store="sftp://alice@host/store")  # a user alone is no secret
    # the flat names of earlier versions are the sections' fields
    flat = PretrainParams(eval_tasks=[], max_resubmits=1, straggler_windows=4, tracker="mlflow")
    assert flat == PretrainParams(
        evaluation={"tasks": []},
        resubmission={"max_resubmits": 1},
        stragglers={"windows": 4},
        tracker={"kind": "mlflow"},
    )
