"""`python -m training.sample` and `python -m training.export_hf` as a user runs them (real subprocesses)."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import REPO

from training import checkpoint as ck
from training.config import load_config
from training.model import GPT
from training.sample import generate


def _cli(*args, check=True):
    p = subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    cfg = load_config("tiny")
    torch.manual_seed(1)
    model = GPT(cfg.model)
    run = str(tmp_path_factory.mktemp("run"))
    ck.write_checkpoint(run, 3, model=model, optimizer=None, config=cfg, rank_state={})
    return run


def test_sample_is_deterministic_for_a_seed(run_dir):
    args = (
        "training.sample",
        "--checkpoint",
        run_dir,
        "--prompt",
        "Hello",
        "--num-samples",
        "2",
        "--max-new-tokens",
        "8",
        "--json",
    )
    a = json.loads(_cli(*args, "--seed", "5").stdout)
    b = json.loads(_cli(*args, "--seed", "5").stdout)
    c = json.loads(_cli(*args, "--seed", "6").stdout)
    assert a == b and a != c and len(a) == 2 and all(t.startswith("Hello") for t in a)


def test_sample_from_missing_checkpoint_fails_clearly(tmp_path):
    p = _cli("training.sample", "--checkpoint", str(tmp_path / "nope"), check=False)
    assert p.returncode == 2 and "neither a checkpoint" in p.stderr


def test_export_then_sample_from_hf_dir_gives_the_same_text(run_dir, tmp_path):
    out = tmp_path / "hf"
    _cli("training.export_hf", "--checkpoint", run_dir, "--out", str(out))
    common = (
        "--prompt",
        "The",
        "--num-samples",
        "1",
        "--max-new-tokens",
        "6",
        "--seed",
        "3",
        "--json",
    )
    from_ckpt = json.loads(_cli("training.sample", "--checkpoint", run_dir, *common).stdout)
    from_hf = json.loads(_cli("training.sample", "--hf", str(out), *common).stdout)
    assert from_ckpt == from_hf


@pytest.mark.slow
def test_generation_is_the_same_with_a_compiled_model():
    cfg = load_config("tiny")
    model = GPT(cfg.model).eval()
    compiled = torch.compile(model)
    compiled(torch.zeros(1, 8, dtype=torch.long))  # the compiled module really runs
    kw = dict(num_samples=2, max_new_tokens=10, seed=11)
    assert generate(compiled, [15496, 11], **kw) == generate(model, [15496, 11], **kw)
