"""HellaSwag (ours) and lm-eval on checkpoints; no hub: examples and task YAMLs are written by the tests."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import REPO, make_examples, tiny_hellaswag_task, write_jsonl

from evaluation.evaluate import evaluate
from training import checkpoint as ck
from training.config import load_config
from training.model import GPT


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = load_config("tiny", ["block_size=128", "seq_len=64"])
    torch.manual_seed(2)
    model = GPT(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # less uniform predictions than a fresh init
    run = tmp_path_factory.mktemp("store") / "runs" / "r"
    return ck.write_checkpoint(str(run), 7, model=model, optimizer=None, config=cfg, rank_state={})


def test_evaluate_writes_results_and_second_call_is_a_cache_hit(checkpoint, tmp_path):
    data = write_jsonl(tmp_path / "hs.jsonl", make_examples(10, seed=1))
    first = evaluate(checkpoint, ["hellaswag"], hellaswag_data=data)
    assert first["hellaswag"]["n"] == 10 and first["hellaswag"]["cached"] is False
    stored = json.loads(
        ck.resolve(checkpoint).url and open(f"{checkpoint}/eval/hellaswag.json").read()
    )
    assert stored["acc"] == first["hellaswag"]["acc"] and stored["step"] == 7
    assert stored["references"]["gpt2-124m (OpenAI weights, this method: acc_norm)"] == 0.2955
    second = evaluate(checkpoint, ["hellaswag"], hellaswag_data=data)
    assert (
        second["hellaswag"]["cached"] is True
        and second["hellaswag"]["acc"] == first["hellaswag"]["acc"]
    )
    third = evaluate(
        checkpoint, ["hellaswag"], hellaswag_data=data, limit=5
    )  # other work: not a cache hit
    assert third["hellaswag"]["cached"] is False and third["hellaswag"]["n"] == 5
    # the same file, other examples in it (a new version staged over it): evaluated again, not the old result
    write_jsonl(tmp_path / "hs.jsonl", make_examples(10, seed=2))
    fourth = evaluate(checkpoint, ["hellaswag"], hellaswag_data=data)
    assert fourth["hellaswag"]["cached"] is False


def test_lm_eval_on_the_export_matches_our_scoring(checkpoint, tmp_path, enc, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    examples = make_examples(16, seed=3)
    data = write_jsonl(tmp_path / "hs.jsonl", examples)
    tasks = tiny_hellaswag_task(tmp_path, data)
    summary = evaluate(
        checkpoint,
        ["hellaswag", "tiny_hellaswag"],
        hellaswag_data=data,
        include_path=tasks,
        batch_size=4,
    )
    lm = summary["lm_eval"]["tasks"]["tiny_hellaswag"]
    assert summary["lm_eval"]["n_samples"]["tiny_hellaswag"] == 16
    # lm-eval's acc (summed log-likelihood of " " + ending) is our acc (summed loss) on the same examples
    assert lm["acc"] == pytest.approx(summary["hellaswag"]["acc"])
    saved = json.load(open(f"{checkpoint}/eval/lm_eval.json"))
    assert saved["tasks"]["tiny_hellaswag"]["acc"] == lm["acc"] and saved["versions"]["lm_eval"]
    export = saved["hf_export"]
    assert os.path.exists(f"{export}/model.safetensors") and os.path.exists(
        f"{export}/tokenizer.json"
    )
    again = evaluate(checkpoint, ["tiny_hellaswag"], include_path=tasks)
    assert again["lm_eval"]["cached"] is True


@pytest.fixture(scope="module")
def fast_checkpoint(tmp_path_factory):
    """A checkpoint of the fast recipe's architecture: no Hugging Face GPT-2 can hold it."""
    over = ["block_size=128", "seq_len=64", "pos_emb=rope", "tie_embeddings=false", "mlp_act=relu2"]
    over += ["qk_norm=true", "logit_softcap=15"]
    cfg = load_config("tiny", over)
    torch.manual_seed(2)
    model = GPT(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    run = tmp_path_factory.mktemp("store") / "runs" / "fast"
    return ck.write_checkpoint(str(run), 5, model=model, optimizer=None, config=cfg, rank_state={})


def test_a_checkpoint_that_is_not_gpt2_shaped_is_evaluated_by_lm_eval_in_process(
    fast_checkpoint, tmp_path, monkeypatch
):
    """lm-eval runs the checkpoint itself (evaluation/lm_eval_model.py): its accuracy is our scorer's on the
    same examples, and no Hugging Face export is written (none could hold it)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = write_jsonl(tmp_path / "hs.jsonl", make_examples(16, seed=4))
    tasks = tiny_hellaswag_task(tmp_path, data)
    summary = evaluate(
        fast_checkpoint, ["hellaswag", "tiny_hellaswag"], hellaswag_data=data, include_path=tasks
    )
    lm = summary["lm_eval"]["tasks"]["tiny_hellaswag"]
    assert summary["lm_eval"]["n_samples"]["tiny_hellaswag"] == 16
    # acc (summed log-likelihood); lm-eval's acc_norm divides by bytes, ours by tokens
    assert lm["acc"] == pytest.approx(summary["hellaswag"]["acc"])
    saved = json.load(open(f"{fast_checkpoint}/eval/lm_eval.json"))
    assert saved["hf_export"] is None and not os.path.exists(
        os.path.join(os.path.dirname(os.path.dirname(fast_checkpoint)), "exports")
    )


def test_the_lm_eval_command_line_runs_our_model_and_refuses_an_export_it_cannot_hold(
    fast_checkpoint, tmp_path
):
    data = write_jsonl(tmp_path / "hs.jsonl", make_examples(6, seed=5))
    tasks = tiny_hellaswag_task(tmp_path, data)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    p = subprocess.run(
        [sys.executable, "-m", "evaluation.lm_eval_model", "--model", "gpt2repro"]
        + ["--model_args", f"checkpoint={fast_checkpoint}", "--tasks", "tiny_hellaswag"]
        + ["--include_path", tasks, "--batch_size", "2"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "tiny_hellaswag" in p.stdout and "acc_norm" in p.stdout
    out = tmp_path / "export"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.export_hf",
            "--checkpoint",
            fast_checkpoint,
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2 and not out.exists(), p.stderr
    assert (
        p.stderr.strip().splitlines()[-1].startswith("error: this checkpoint is not GPT-2-shaped")
    )


def test_evaluate_cli_prints_json_summary(checkpoint, tmp_path):
    data = write_jsonl(tmp_path / "hs.jsonl", make_examples(6, seed=4))
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "evaluation.evaluate",
            "--checkpoint",
            checkpoint,
            "--tasks",
            "hellaswag",
            "--hellaswag-data",
            data,
            "--limit",
            "4",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert set(out["hellaswag"]) >= {"acc", "acc_norm", "n"} and out["hellaswag"]["n"] == 4
    bad = subprocess.run(
        [sys.executable, "-m", "evaluation.evaluate", "--checkpoint", str(tmp_path / "none")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "neither a checkpoint" in bad.stderr
    # a checkpoint copied out of its run directory: no store to find HellaSwag in, and nothing written beside it
    lone = tmp_path / "kept" / "step_000007"
    shutil.copytree(checkpoint, lone, ignore=shutil.ignore_patterns("eval"))
    p = subprocess.run(
        [sys.executable, "-m", "evaluation.evaluate", "--checkpoint", lone, "--tasks", "hellaswag"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == (
        f"error: {lone} is not in a store's runs/{{run}}/checkpoints/ folder, so there is no store HellaSwag file "
        "to default to: give --hellaswag-data"
    ), p.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["hs.jsonl", "kept"]


def test_hellaswag_split_over_two_torchrun_ranks_equals_one_process(checkpoint, tmp_path):
    data = write_jsonl(tmp_path / "hs.jsonl", make_examples(9, seed=6))
    single = evaluate(checkpoint, ["hellaswag"], hellaswag_data=data)["hellaswag"]
    os.remove(f"{checkpoint}/eval/hellaswag.json")  # force recomputation
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "evaluation.evaluate",
            "--checkpoint",
            checkpoint,
            "--tasks",
            "hellaswag",
            "--hellaswag-data",
            data,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert p.returncode == 0, p.stderr[-3000:]
    dist = json.loads(p.stdout)["hellaswag"]
    assert (dist["acc"], dist["acc_norm"], dist["n"]) == (single["acc"], single["acc_norm"], 9)
