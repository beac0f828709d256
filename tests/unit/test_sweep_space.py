"""A sweep's search space (flows/sweep_space.py): what is refused before any trial, and the grid."""

import pytest
from pydantic import ValidationError

from flows.sweep_space import SweepError, SweepSpace


def space(**kw):
    base = {
        "preset": "tiny",
        "trials": 4,
        "dimensions": [
            {"key": "optim.max_lr", "low": 1e-3, "high": 3e-2, "log": True},
            {"key": "optimizer", "choices": ["adamw", "muon"]},
        ],
    }
    return SweepSpace(**{**base, **kw})


def test_a_good_space_passes_and_its_trials_are_config_overrides():
    s = space()
    s.check()
    assert s.trial_overrides({"optim.max_lr": 0.01, "optimizer": "muon"}) == [
        "optim.max_lr=0.01",
        "optimizer=muon",
    ]


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"dimensions": [{"key": "optim.max_lrr", "low": 1e-3, "high": 1e-2}]}, "optim.max_lrr"),
        ({"dimensions": [{"key": "max_lr", "low": -1.0, "high": 1e-2}]}, "refuses -1.0"),
        ({"dimensions": [{"key": "optimizer", "choices": ["adamw", "sgd"]}]}, "refuses 'sgd'"),
        ({"dimensions": [{"key": "n_head", "choices": [2, 3]}]}, "refuses 3"),
        ({"preset": "no-such-preset"}, "base config"),
        (
            {"sampler": "grid", "dimensions": [{"key": "max_lr", "low": 1e-3, "high": 1e-2}]},
            "continuous range",
        ),
        (
            {
                "sampler": "grid",
                "trials": 5,
                "dimensions": [{"key": "n_layer", "low": 1, "high": 2, "integer": True}],
            },
            "the grid holds 2 trials",
        ),
    ],
)
def test_what_cannot_run_is_refused_before_any_trial(kw, needle):
    with pytest.raises(SweepError, match=None) as err:
        space(**kw).check()
    assert needle in str(err.value)


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"dimensions": []}, "at least 1"),
        ({"trials": 0}, "greater than 0"),
        ({"dimensions": [{"key": "max_lr", "low": 1e-2, "high": 1e-3}]}, "low < high"),
        ({"dimensions": [{"key": "max_lr", "low": 0.0, "high": 1e-3, "log": True}]}, "low > 0"),
        ({"dimensions": [{"key": "max_lr"}]}, "one of low and high, choices, or sets"),
        ({"dimensions": [{"key": "max_lr", "choices": [1], "low": 1, "high": 2}]}, "one of"),
        ({"dimensions": [{"key": "s", "choices": [1], "sets": {"a": {"n_layer": 1}}}]}, "one of"),
        ({"dimensions": [{"key": "s", "sets": {}}]}, "at least 1"),
        ({"dimensions": [{"key": "s", "sets": {"a": {}}}]}, "set 'a' sets nothing"),
        # names a table, a tag or a param shows: no line break, no markup
        ({"dimensions": [{"key": "s", "sets": {"a\n| b": {"n_layer": 1}}}]}, "letters, digits"),
        ({"dimensions": [{"key": "s|x", "sets": {"a": {"n_layer": 1}}}]}, "letters, digits"),
        ({"dimensions": [{"key": "s", "sets": {"": {"n_layer": 1}}}]}, "1 to 100"),
        (
            {"dimensions": [{"key": "max_lr", "choices": [1]}, {"key": "max_lr", "choices": [2]}]},
            "swept twice",
        ),
        ({"dimensions": [{"key": "max_lr", "choices": [1]}], "budget": 3}, "Extra inputs"),
    ],
)
def test_a_malformed_space_is_a_validation_error_naming_the_field(kw, needle):
    with pytest.raises(ValidationError) as err:
        space(**kw)
    assert needle in str(err.value)


def test_a_grid_is_every_combination_in_a_fixed_order():
    s = space(
        sampler="grid",
        trials=4,
        dimensions=[
            {"key": "n_layer", "low": 1, "high": 2, "integer": True},
            {"key": "qk_norm", "choices": [False, True]},
        ],
    )
    s.check()
    assert s.grid_points() == [
        {"n_layer": 1, "qk_norm": False},
        {"n_layer": 1, "qk_norm": True},
        {"n_layer": 2, "qk_norm": False},
        {"n_layer": 2, "qk_norm": True},
    ]
    assert s.trial_overrides(s.grid_points()[1]) == ["n_layer=1", "qk_norm=true"]


SHAPES = {
    "key": "shape",
    "sets": {
        "d1": {"n_layer": 1, "n_head": 2, "n_embd": 16},
        "d2": {"n_layer": 2, "n_head": 4, "n_embd": 32},
    },
}


def test_values_that_go_together_are_one_dimension_of_named_sets():
    s = space(
        sampler="grid", trials=4, dimensions=[SHAPES, {"key": "max_lr", "choices": [1e-2, 1e-3]}]
    )
    s.check()
    assert s.grid_points()[2] == {
        "shape": "d2",
        "max_lr": 1e-2,
    }  # a trial's value is its set's name
    assert s.trial_overrides(s.grid_points()[2]) == [
        "n_layer=2",
        "n_head=4",
        "n_embd=32",
        "max_lr=0.01",
    ]
    with pytest.raises(SweepError, match="has no set 'd9'"):  # a study made from another space
        s.trial_overrides({"shape": "d9", "max_lr": 1e-2})


@pytest.mark.parametrize(
    "dims, needle",
    [
        # every set is tried whole: n_head must divide n_embd
        (
            [{"key": "shape", "sets": {"ok": {"n_head": 2}, "odd": {"n_head": 3, "n_embd": 16}}}],
            "dimension 'shape': the run config refuses set 'odd'",
        ),
        ([{"key": "shape", "sets": {"a": {"n_layr": 2}}}], "unknown config key 'n_layr'"),
        ([SHAPES, {"key": "model.n_embd", "choices": [8, 16]}], "model.n_embd is swept by two"),
    ],
)
def test_a_set_that_cannot_run_or_that_another_dimension_sweeps_is_refused(dims, needle):
    with pytest.raises(SweepError) as err:
        space(dimensions=dims).check()
    assert needle in str(err.value)


def test_a_grid_trial_whose_values_clash_is_refused_before_any_trial():
    """n_head=4 and n_embd=6 are each a config of the tiny preset (n_embd 16, n_head 2), not together."""
    clash = [{"key": "n_head", "choices": [2, 4]}, {"key": "n_embd", "choices": [16, 6]}]
    with pytest.raises(SweepError) as err:
        space(sampler="grid", trials=4, dimensions=clash).check()
    assert "the grid's trial {'n_head': 4, 'n_embd': 6}: the run config refuses it" in str(
        err.value
    )
    space(sampler="grid", trials=3, dimensions=clash).check()  # the budget stops before that trial


def test_a_sampler_draws_a_set_by_its_name(tmp_path):
    import optuna

    from flows.sweep_study import suggest

    s = space(sampler="random", dimensions=[SHAPES])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = {suggest(study.ask(), s)["shape"] for _ in range(20)}
    assert drawn == {"d1", "d2"}


def _sweep(**kw):
    from flows.sweep import SweepParams

    space = {
        "preset": "tiny",
        "dimensions": [{"key": "optim.max_lr", "choices": [1e-2]}],
        "trials": 1,
    }
    return SweepParams.model_validate({"name": "s", "space": space, **kw})


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"run": {"overrides": ["max_steps=5"]}}, "put fixed ones in space.overrides"),
        ({"study_url": "postgresql://u:secret@db/optuna"}, "study_url carries a password"),
        ({"name": "../up"}, "name"),
    ],
)
def test_sweep_parameters_that_would_mislead_are_refused(kw, needle):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as err:
        _sweep(**kw)
    assert needle in str(err.value) and "secret" not in str(err.value)


def test_a_study_needs_a_database_when_the_store_is_not_a_filesystem(tmp_path):
    assert _sweep(run={"store": str(tmp_path)}).storage_url() == (
        f"sqlite:///{tmp_path}/sweeps/s/study.db"
    )
    with pytest.raises(SweepError, match="give study_url"):
        _sweep(run={"store": "s3://bucket/store"}).storage_url()
    url = "postgresql://db.internal/optuna"
    assert _sweep(run={"store": "s3://bucket/store"}, study_url=url).storage_url() == url


def test_the_trials_table_has_one_set_of_columns_whatever_each_trial_has(tmp_path):
    """A trial evaluated, one pruned before its first evaluation, one still running: one table."""
    import logging

    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    from flows.sweep import SweepDriver

    p = _sweep(run={"store": str(tmp_path)})
    study = optuna.create_study()
    lr = {"optim.max_lr": FloatDistribution(1e-4, 1e-1)}
    for i, state in enumerate([TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING]):
        value = 3.0 if state == TrialState.COMPLETE else None
        study.add_trial(create_trial(state=state, value=value, params={"optim.max_lr": 0.01 * (i + 1)},
                                     distributions=lr))  # fmt: skip
    driver = SweepDriver(p, study, logging.getLogger("test"))
    base = {"best_val_loss": 3.0, "final_val_loss": 3.0, "final_step": 10, "tokens": 100}
    driver.records = {
        0: {**base, "trial": 0, "run": "s-t000", "state": "completed", "eval": {"hellaswag": 0.3}},
        1: {**base, "trial": 1, "run": "s-t001", "state": "pruned", "eval": {}},
    }
    rows = driver.rows()
    assert len({tuple(r) for r in rows}) == 1  # the same columns, in the same order
    assert [r["hellaswag"] for r in rows] == [0.3, "", ""]
    assert [r["state"] for r in rows] == ["completed", "pruned", "running"]
    assert driver.winner()["trial"] == 0
    # the summary a tracker's parent run shows: the same trials, typed, read back as written
    from common.sweep_summary import read_summary, write_summary

    write_summary(driver.sweep_summary(finished=True))
    summary = read_summary(p.folder())
    assert [(t.trial, t.state, t.final_val_loss) for t in summary.trials] == [
        (0, "completed", 3.0),
        (1, "pruned", 3.0),
        (2, "running", None),
    ]
    assert summary.winner == 0 and summary.finished and summary.settings["pruner"] == "halving"


def test_a_trials_tracker_run_goes_under_its_sweeps_and_tensorboard_puts_the_trials_side_by_side(
    tmp_path,
):
    untracked = _sweep(run={"store": str(tmp_path)})
    assert untracked.trial_params(3, []).tracker.kind == "none"
    assert untracked.trial_params(3, []).tracker.sweep is None

    mlflow = _sweep(run={"store": str(tmp_path), "tracker": {"kind": "mlflow", "uri": "http://m"}})
    t = mlflow.trial_params(3, []).tracker
    assert (t.sweep, t.uri) == (f"{tmp_path}/sweeps/s", "http://m")  # the one server, as given

    tb = _sweep(run={"store": str(tmp_path), "tracker": {"kind": "tensorboard"}})
    assert tb.trial_params(3, []).tracker.uri == f"{tmp_path}/sweeps/s/tensorboard/s-t003"
    tb = _sweep(
        run={"store": str(tmp_path), "tracker": {"kind": "tensorboard", "uri": "s3://b/tb/"}}
    )
    assert tb.trial_params(3, []).tracker.uri == "s3://b/tb/s-t003"


def test_a_summary_file_that_is_not_one_is_refused_when_read(tmp_path):
    from common.layout import SweepDir
    from common.sweep_summary import read_summary

    folder = SweepDir(str(tmp_path))
    assert read_summary(folder) is None
    (tmp_path / "summary.json").write_text('{"sweep": "s", "trials": "all of them"}')
    with pytest.raises(ValueError):
        read_summary(folder)
