"""The CLIs as a user runs them, with generated arguments: every run ends in exit 0, 2 (bad input) or 75, with
at most one line of error and no traceback on stderr, and writes nothing outside the folder it was given. The
same boundaries in-process, with a larger budget: tests/unit/test_fuzz_boundaries.py."""

import os
import subprocess
import sys

import pytest
from helpers import REPO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from training.config import LEAF_PATHS

# argv cannot hold NUL; everything else that breaks parsers can come
TEXT = st.text(
    alphabet=st.sampled_from(list("abc-_./: \n\r\t'\"$;#@[]{}=+%0123456789") + ["é", "東"]),
    max_size=24,
)
KEYS = [
    k for k in LEAF_PATHS if k != "train.run_dir"
]  # the run directory is the one place it may write
CLI = settings(
    max_examples=6, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
# commands that refuse before importing torch: a bigger budget costs little
QUICK_CLI = settings(CLI, max_examples=30)


def _run(cwd, module, *args, api=""):
    env = dict(os.environ, PREFECT_API_URL=api, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


def _files(root):
    return {p for p in root.rglob("*")}


def _contained(tmp_path_factory, module, *args, allowed=(0, 2, 75), api=""):
    """The command in an empty folder: its exit and stderr, and nothing written but under run/."""
    cwd = tmp_path_factory.mktemp("cli")
    p = _run(cwd, module, *args, api=api)
    assert p.returncode in allowed, (args, p.stderr[-2000:])
    assert "Traceback" not in p.stderr, (args, p.stderr[-3000:])
    assert sum(ln.startswith("error:") for ln in p.stderr.splitlines()) <= 1, p.stderr[-2000:]
    outside = {f for f in _files(cwd) if (cwd / "run") not in f.parents and f != cwd / "run"}
    assert not outside, (args, sorted(map(str, outside)))
    return p


@CLI
@given(st.lists(st.tuples(st.sampled_from(KEYS) | TEXT, TEXT), min_size=1, max_size=3))
def test_training_with_generated_overrides(tmp_path_factory, overrides):
    sets = [a for k, v in overrides for a in ("--set", f"{k}={v}")]
    _contained(
        tmp_path_factory, "training.train", "--config", "tiny", "--set", "run_dir=run", *sets
    )


@CLI
@given(TEXT, st.sampled_from(["--limit", "--tasks", "--device", "--hellaswag-data"]), TEXT)
def test_evaluation_with_generated_arguments(tmp_path_factory, checkpoint, flag, value):
    _contained(
        tmp_path_factory, "evaluation.evaluate", "--checkpoint", f"run/{checkpoint}", flag, value
    )


@CLI
@given(st.sampled_from(["--run-name", "--store", "--preset", "--executor", "--nproc", "--hang-floor-s",
                        "--eval-tasks", "--tracker", "--params"]), TEXT)  # fmt: skip
def test_the_flow_with_generated_parameters(tmp_path_factory, flag, value):
    # a value the flow accepts would start it (a Prefect server): only refusals are looked at here
    p = _run(tmp_path_factory.mktemp("flow"), "flows.pretrain", "--params", "{\"store\": \"run\"}",
             flag, value, "--nproc", "0")  # fmt: skip
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert sum(ln.startswith("error:") for ln in p.stderr.splitlines()) <= 1


@QUICK_CLI
@given(st.lists(st.tuples(st.sampled_from(["--source", "--shard-tokens", "--workers", "--out"]), TEXT),
                min_size=1, max_size=3))  # fmt: skip
def test_data_prep_with_generated_arguments(tmp_path_factory, flags):
    # local sources only (under run/): a hub spec would reach for the network
    args = [a for f, v in flags for a in (f, f"run/{v}" if f in ("--source", "--out") else v)]
    _contained(tmp_path_factory, "data_prep.fineweb", "--source", "run/none.parquet", "--out",
               "run/out", *args)  # fmt: skip


SPEC_FLAGS = ["--partition", "--account", "--qos", "--constraint", "--job-name", "--sbatch-extra",
              "--setup", "--time", "--nodes", "--gpus-per-node", "--mem-gb", "--max-resubmits",
              "--backoff-s", "--hang-floor-s", "--progress-s", "--reattach"]  # fmt: skip


@QUICK_CLI
@given(st.lists(st.tuples(st.sampled_from(SPEC_FLAGS), TEXT), min_size=1, max_size=3))
def test_a_slurm_submission_with_generated_job_fields(tmp_path_factory, flags):
    # max_steps=-1 makes even a spec the cluster would take a refusal: nothing is ever queued here
    args = [a for f, v in flags for a in (f, v)]
    _contained(tmp_path_factory, "cluster.submit", "--config", "tiny", "--folder", "run/slurm",
               "--set", "max_steps=-1", *args, allowed=(2,))  # fmt: skip


# The other commands: what keeps each one local and quick (a source, checkpoint or run that is not there, a
# Prefect server that does not answer), and the flags generated on top; values of path flags go under run/.
OTHERS = {
    "cluster.prep_array": (["--source", "run/none.parquet", "--out", "run/out", "--folder", "run/slurm"],
                           ["--source", "--out", "--shard-tokens", "--parallelism", "--partition",
                            "--job-name", "--sbatch-extra", "--time-min", "--cpus-per-task"]),
    "data_prep.verify": (["run/none"], []),
    "evaluation.demo_task": (["--store", "run/store"], ["--store"]),
    "evaluation.hellaswag_data": (["--out", "run/out", "--source", "run/none.jsonl"], ["--out", "--source"]),
    "evaluation.plots": (["run/none"], ["--out"]),
    "evaluation.summary": (["run/none"], ["--json"]),
    "flows.follow": (["0b5e4f52-6f67-4a52-9b7e-5d1d7a3e0c11"], ["--timeout", "--tasks"]),
    "flows.serve": (["--store", "run/store"], ["--print-demo-params", "--store", "--executor"]),
    "tracking.mirror": (["--run-dir", "run/none", "--tracker", "tensorboard"],
                        ["--run-dir", "--uri", "--project", "--interval-s", "--finish-timeout-s"]),
    "tracking.sweep_mirror": (["--sweep-dir", "run/none", "--tracker", "tensorboard"],
                              ["--sweep-dir", "--uri", "--project", "--interval-s", "--finish-timeout-s"]),
    "training.export_hf": (["--checkpoint", "run/none", "--out", "run/out"], ["--checkpoint", "--out"]),
    "training.sample": (["--checkpoint", "run/none"], ["--checkpoint", "--prompt", "--num-samples",
                        "--max-new-tokens", "--top-k", "--temperature", "--seed", "--device"]),
}  # fmt: skip
PATH_FLAGS = {
    "--source",
    "--out",
    "--store",
    "--run-dir",
    "--sweep-dir",
    "--checkpoint",
    "--folder",
}
SWITCHES = {"--tasks", "--json"}
FEW = settings(CLI, max_examples=4)


@pytest.mark.parametrize("module", sorted(OTHERS))
@FEW
@given(data=st.data())
def test_every_other_command_with_generated_arguments(tmp_path_factory, module, data):
    fixed, flags = OTHERS[module]
    args = list(fixed)
    for flag in data.draw(st.lists(st.sampled_from(flags), max_size=3)) if flags else []:
        if flag in SWITCHES:
            args.append(flag)
            continue
        value = data.draw(TEXT)
        args += [flag, f"run/{value}" if flag in PATH_FLAGS else value]
    if not flags:
        args = [f"run/{data.draw(TEXT)}"]
    # 1 is a documented code too: a server that does not answer (flows.follow), nothing to mirror
    _contained(tmp_path_factory, module, *args, allowed=(0, 1, 2), api="http://127.0.0.1:9/api")


NUMBER = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(10**12), 10**12)


@CLI
@given(
    name=TEXT,
    key=st.sampled_from(KEYS) | TEXT,
    dim=st.fixed_dictionaries({"low": NUMBER, "high": NUMBER}, optional={"log": st.booleans()})
    | st.fixed_dictionaries({"choices": st.lists(TEXT | NUMBER | st.booleans(), max_size=3)}),
    sampler=st.sampled_from(["grid", "random", "tpe"]) | TEXT,
    trials=st.integers(-2, 5),
)
def test_the_sweep_with_generated_parameters(tmp_path_factory, name, key, dim, sampler, trials):
    """Whatever the space, the sweep refuses in one line before a trial: a bad one for what it is, a good one
    because the Prefect server does not answer. Its study, when it makes one, stays under the store given."""
    import json

    params = {
        "name": name,
        "space": {"preset": "tiny", "dimensions": [{"key": key, **dim}], "sampler": sampler,
                  "trials": trials},
        "run": {"store": "run/store", "evaluation": {"tasks": []}},
    }  # fmt: skip
    p = _contained(
        tmp_path_factory,
        "flows.sweep",
        "--params",
        json.dumps(params),
        allowed=(2,),
        api="http://127.0.0.1:9/api",
    )
    assert p.stderr.startswith("error: ")
