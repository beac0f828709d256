"""HellaSwag (ours) and lm-eval on checkpoints; no hub: examples and task YAMLs are written by the tests."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import REPO, make_examples, small_hf_model, write_jsonl
from torch.nn import functional as F

from evaluation import hellaswag as hs
from evaluation.evaluate import evaluate
from evaluation.hellaswag_data import HellaSwagDataError, read_examples
from training import checkpoint as ck
from training.config import load_config
from training.hf import gpt_from_hf
from training.model import GPT


def test_hellaswag_scores_equal_an_independent_computation_with_transformers(enc):
    hf = small_hf_model(seed=5, n_positions=128)
    ours = gpt_from_hf(hf).eval()
    examples = make_examples(12)
    got = hs.evaluate(ours, examples, enc, torch.device("cpu"))
    correct = correct_norm = 0
    for ex in examples:
        sums, means = [], []
        for ending in ex["endings"]:
            ctx, end = enc.encode(ex["ctx"]), enc.encode(" " + ending)
            with torch.no_grad():
                logp = F.log_softmax(hf(torch.tensor([ctx + end])).logits[0].float(), dim=-1)
            nll = [-logp[len(ctx) + j - 1, tok].item() for j, tok in enumerate(end)]
            sums.append(sum(nll))
            means.append(sum(nll) / len(nll))
        correct += min(range(4), key=sums.__getitem__) == ex["label"]
        correct_norm += min(range(4), key=means.__getitem__) == ex["label"]
    assert got == {"acc": correct / 12, "acc_norm": correct_norm / 12, "n": 12}
    preds = [
        int(hs.ending_losses(ours, hs.render(ex, enc), torch.device("cpu"))[0].argmin())
        for ex in examples
    ]
    assert len(set(preds)) > 1  # a scorer that always says "0" would not pass unnoticed


def test_bad_hellaswag_file_is_a_clear_error(tmp_path):
    url = write_jsonl(tmp_path / "hs.jsonl", [{"ctx": "x", "endings": ["a", "b"], "label": 0}])
    with pytest.raises(HellaSwagDataError, match="line 1"):
        read_examples(url)


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


def test_lm_eval_on_the_export_matches_our_scoring(checkpoint, tmp_path, enc, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    examples = make_examples(16, seed=3)
    data = write_jsonl(tmp_path / "hs.jsonl", examples)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_hellaswag.yaml").write_text(f"""task: tiny_hellaswag
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{endings}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    summary = evaluate(
        checkpoint,
        ["hellaswag", "tiny_hellaswag"],
        hellaswag_data=data,
        include_path=str(tasks),
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
    again = evaluate(checkpoint, ["tiny_hellaswag"], include_path=str(tasks))
    assert again["lm_eval"]["cached"] is True


def test_a_stock_lm_eval_task_beside_local_ones_is_still_found(tmp_path):
    """Only the include path is indexed when it holds every task asked for (the stock index costs ~13 s an
    evaluation); a stock task asked for beside a local one, or a local group, brings the whole index back."""
    from lm_eval.tasks import TaskManager

    from evaluation.lm_eval_runner import _task_manager

    (tmp_path / "tiny.yaml").write_text(
        "task: tiny\ndataset_path: json\noutput_type: multiple_choice\n"
    )
    (tmp_path / "suite.yaml").write_text(
        "group: suite\ntask: [tiny, arc_easy]\n"
    )  # a local group of stock tasks
    assert _task_manager(TaskManager, ["tiny"], str(tmp_path)).all_tasks == ["suite", "tiny"]
    # one whole index (~13 s) for both cases: a stock task asked for, and a local group naming one
    assert {"tiny", "suite", "arc_easy", "hellaswag"} <= set(
        _task_manager(TaskManager, ["tiny", "arc_easy"], str(tmp_path)).all_tasks
    )
    from evaluation.lm_eval_runner import _local_index_serves

    local = TaskManager(include_path=str(tmp_path), include_defaults=False)
    assert _local_index_serves(local, ["tiny"]) and not _local_index_serves(local, ["suite"])


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


@pytest.mark.parametrize("root", ["/data/store", "s3://bucket/store"])
def test_a_checkpoint_s_export_goes_to_its_run_or_into_its_own_eval_folder(root):
    from common.layout import RunDir, hf_export

    inside = f"{root}/runs/r/checkpoints/step_000007"
    assert hf_export(inside, 7) == f"{root}/runs/r/exports/step_000007-hf"
    assert (
        RunDir.of_checkpoint(inside).store.hellaswag == f"{root}/data/hellaswag/hellaswag_val.jsonl"
    )
    lone = f"{root}/kept/step_000007"  # copied out of its run: the export stays inside it, never in {root}/exports
    assert RunDir.of_checkpoint(lone) is None and hf_export(lone, 7) == f"{lone}/eval/hf-export"
    assert (
        RunDir.of_checkpoint(f"{root}/elsewhere/checkpoints/step_000007").store is None
    )  # not under runs/


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
