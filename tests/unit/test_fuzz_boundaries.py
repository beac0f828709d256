"""Every boundary tried by a program, not by hand: generated parameters, config overrides, job specs and on-disk
records (valid ones mutated field by field) must end in the record or a clear refusal of the boundary's own
kind, never in another exception (a traceback for a user's input), and a job script must never gain a line.

Hypothesis draws the inputs with a bounded budget (tests/conftest.py: the `ci` profile, no example database
in the repository). The same boundaries through the real CLIs: tests/e2e/test_fuzz_cli.py."""

import json
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from cluster.failure import Failure
from cluster.rank_exits import RankExit
from cluster.spec import JobSpec
from common import lease
from flows.params import FLAT_NAMES, PretrainParams
from training import checkpoint as ck
from training.config import LEAF_PATHS, ConfigError, load_config
from training.guard import Divergence

# any JSON value, and text with the characters that break things: line breaks, quotes, NUL, path pieces
TEXT = st.text(
    alphabet=st.sampled_from(list("abc-_./: \n\r\t\x00'\"$;#@[]{}=+%") + ["é", "東"]), max_size=30
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)


def mutations(valid: dict):
    """`valid` with one field replaced by any JSON value, removed, or an unknown field added."""
    keys = st.sampled_from(sorted(valid))
    return st.one_of(
        st.builds(lambda k, v: {**valid, k: v}, keys, JSON),
        st.builds(lambda k: {x: y for x, y in valid.items() if x != k}, keys),
        st.builds(lambda k, v: {**valid, k: v}, TEXT, JSON),
    )


# ------------------------------------------------------------------------------------------ parameters


@given(
    st.dictionaries(st.sampled_from(sorted(PretrainParams.model_fields) + sorted(FLAT_NAMES)), JSON)
)
def test_the_flows_parameters_are_a_model_or_a_validation_error(params):
    try:
        p = PretrainParams.model_validate(params)
    except ValidationError:
        return
    PretrainParams.model_validate(
        p.model_dump()
    )  # what it accepted, it accepts again from its own form
    assert p.run_name not in (".", "..") and "\n" not in p.run_name


@given(st.lists(st.tuples(st.sampled_from(LEAF_PATHS) | TEXT, TEXT), max_size=4))
def test_config_overrides_are_a_config_or_a_config_error(overrides):
    try:
        cfg = load_config("tiny", [f"{k}={v}" for k, v in overrides])
    except ConfigError:
        return
    assert cfg.train.seed >= 0 and math.isfinite(cfg.optim.max_lr)


SWEEP_SPACE = {
    "preset": "tiny",
    "sampler": "grid",
    "trials": 2,
    "dimensions": [
        {"key": "shape", "sets": {"a": {"n_layer": 1, "n_head": 2}, "b": {"n_layer": 2}}},
        {"key": "optim.max_lr", "choices": [1e-3]},
    ],
}
KEYS = st.sampled_from(["n_layer", "optim.max_lr", "n_head", "optimizer", "max_steps"]) | TEXT
# values a config key could take, and some it could not (text with line breaks, '=', quotes)
VALUE = st.integers(-2, 70) | st.floats(-1.0, 1.0) | st.booleans() | TEXT
NUMBER = st.integers(-2, 70) | st.floats(-1.0, 70)
DIMENSION = st.one_of(
    st.fixed_dictionaries(
        {"key": KEYS, "low": NUMBER, "high": NUMBER},
        optional={"log": st.booleans(), "integer": st.booleans()},
    ),
    st.fixed_dictionaries({"key": KEYS, "choices": st.lists(VALUE, min_size=1, max_size=3)}),
    st.fixed_dictionaries(
        {
            "key": KEYS,
            "sets": st.dictionaries(
                TEXT, st.dictionaries(KEYS, VALUE, min_size=1, max_size=3), min_size=1, max_size=3
            ),
        }
    ),
    # and of any shape
    st.fixed_dictionaries(
        {"key": JSON},
        optional={k: JSON for k in ("low", "high", "log", "integer", "choices", "sets")},
    ),
)


@given(
    mutations(SWEEP_SPACE)
    | st.lists(DIMENSION, max_size=3).map(lambda d: {**SWEEP_SPACE, "dimensions": d})
    | mutations(SWEEP_SPACE["dimensions"][0]).map(
        lambda d: {**SWEEP_SPACE, "dimensions": [d, SWEEP_SPACE["dimensions"][1]]}
    )
)
def test_a_sweep_space_is_refused_in_one_line_or_every_trial_it_makes_is_a_config(space):
    """What a sweep is given (flows/sweep_space.py): a validation error, a SweepError before any trial, or a
    space whose every grid trial is a config the run accepts."""
    from flows.sweep_space import SweepError, SweepSpace

    try:
        s = SweepSpace.model_validate(space)
        s.check()
    except (ValidationError, SweepError):
        return
    # what the trials table, the tracker's params and tags show of a set: one plain word each
    shown = [n for d in s.dimensions if d.sets for n in (d.key, *d.sets)]
    assert not any(c in n for n in shown for c in "\n\r|` ")
    if s.sampler == "grid":
        for point in s.grid_points()[: s.trials][:4]:
            load_config(s.preset, s.trial_overrides(point))


@given(st.dictionaries(st.sampled_from(sorted(JobSpec.model_fields)), JSON))
def test_a_job_spec_is_a_spec_or_a_validation_error(fields):
    try:
        JobSpec.model_validate(fields)
    except ValidationError:
        return


@given(TEXT, st.sampled_from(["job_name", "account", "partition", "qos", "constraint"]))
def test_no_text_adds_a_line_to_a_job_script(text, field):
    from cluster.sbatch import build_executor

    try:
        spec = JobSpec.model_validate({field: text, "folder": "/tmp/fuzz-slurm"})
    except ValidationError:
        return
    script = build_executor(spec)._make_submission_file_text("python -m x", "uid")
    baseline = build_executor(JobSpec(folder="/tmp/fuzz-slurm"))._make_submission_file_text(
        "python -m x", "uid"
    )
    added = field != "job_name" and bool(
        text
    )  # a directive of its own, unless empty or always there
    assert len(script.splitlines()) == len(baseline.splitlines()) + added


# ------------------------------------------------------------------------------------------ records

RANK_EXIT = {"rank": 1, "exit_code": 75, "error": "", "time": 1.0, "host": "n1"}
FAILURE = {"cause": "node_check", "host": "n1", "detail": "GPU 0", "rank": None, "exit_code": None}
DIVERGENCE = {"steps": [4, 6], "batches": "4:7", "reasons": ["non-finite loss"]}
TRAIN_STATE = {"step": 5, "world_size": 1, "code_version": "x", "config": {}, "data_batch": 5}
LEASE = {"owner": "trainer", "host": "h", "pid": 1, "token": "t", "renewed": 1.0, "ttl_s": 60}


SWEEP_SUMMARY = {
    "sweep": "s",
    "url": "store/sweeps/s",
    "settings": {"pruner": "halving"},
    "trials": [
        {"trial": 0, "run": "s-t000", "params": {"optim.max_lr": 0.01}, "state": "completed"}
    ],
    "winner": 0,
    "finished": True,
}


@given(mutations(SWEEP_SUMMARY) | mutations(SWEEP_SUMMARY["trials"][0]).map(
    lambda t: {**SWEEP_SUMMARY, "trials": [t]}) | JSON)  # fmt: skip
def test_sweep_summaries_are_a_summary_or_a_value_error(obj):
    """What the sweep's tracker mirror reads (common/sweep_summary.py): a summary, or refused as one."""
    from common.sweep_summary import SweepSummary

    try:
        SweepSummary.model_validate(obj).content_hash()
    except ValueError:
        pass


@given(mutations(RANK_EXIT) | JSON)
def test_rank_exit_records(obj):
    try:
        RankExit.parse(obj)
    except ValueError:
        pass


@given(mutations(FAILURE) | JSON)
def test_failure_records(obj):
    try:
        Failure.parse(obj).line()
    except ValueError:
        pass


@given(mutations(DIVERGENCE) | JSON)
def test_divergence_verdicts(obj):
    try:
        verdict = Divergence.from_json(obj)
    except ValueError:
        return
    assert Divergence.from_json(verdict.to_json()) == verdict


@given(mutations(TRAIN_STATE) | JSON)
def test_train_states(obj):
    try:
        ck.TrainState.parse(obj, "step_000005")
    except ck.CheckpointError:
        pass


@given(mutations(LEASE) | JSON)
def test_lease_records_are_a_lease_or_said_not_to_be(obj):
    if lease._malformed(obj) is None:
        lease.Lease.describe(obj)  # what the lease reads as a record, it can describe


@given(mutations({"format": ck.FORMAT, "step": 5, "world_size": 1, "files": {}}) | JSON)
def test_checkpoint_manifests(tmp_path_factory, obj):
    folder = tmp_path_factory.mktemp("ckpt")
    (folder / "manifest.json").write_text(json.dumps(obj))
    try:
        ck.open_checkpoint(str(folder))
    except ck.CheckpointError:
        pass


@pytest.mark.parametrize("text", ["", "{", "[]", "null", '"x"', "1e999"])
def test_checkpoint_manifests_that_are_no_json_object(tmp_path, text):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ck.CheckpointError):
        ck.open_checkpoint(str(tmp_path))


@given(st.lists(st.text(alphabet=st.sampled_from(list("ab./\\~ ")), max_size=8), max_size=3))
def test_a_joined_name_stays_inside_its_folder_or_is_refused(parts):
    """Every path written under a run directory or a store is built by store.join: whatever the names, the
    result lies inside the folder once resolved, or the name is refused."""
    import posixpath

    from common import store

    root = "/store/runs/r"
    try:
        joined = store.join(root, *parts)
    except store.PathEscape as err:
        assert "would lead out of /store/runs/r" in str(err)
        return
    assert posixpath.normpath(joined) == root or posixpath.normpath(joined).startswith(root + "/")


@given(st.dictionaries(st.sampled_from(["rank", "step", "step_s", "pid", "time", "world"]), JSON))
def test_a_heartbeat_of_any_shape_is_read_or_left_out_never_a_traceback(tmp_path_factory, rec):
    """Heartbeats are read by the hang detector on every poll: a record of another shape is left out."""
    from common.heartbeat import HangDetector, HangRules, read_heartbeats
    from common.layout import RunDir

    run = RunDir(str(tmp_path_factory.mktemp("beats")))
    (Path(run.heartbeats)).mkdir(parents=True)
    (Path(run.heartbeats) / "rank-00000.json").write_text(json.dumps(rec))
    beats = read_heartbeats(run)
    assert set(beats) <= {0} and all(isinstance(r, int) for r in beats)
    detector = HangDetector(run, HangRules(floor_s=0.0), owns=lambda beat: True)
    detector.check()
    detector.progress()


@given(st.lists(st.dictionaries(st.sampled_from(["step", "loss", "val_loss"]), JSON), max_size=4))
def test_metrics_lines_of_any_shape_are_parsed_or_skipped(rows):
    from training.metrics import parse_metrics

    parsed = parse_metrics([json.dumps(r) for r in rows])
    assert all(isinstance(r["step"], int) for r in parsed)
