"""HellaSwag scoring against an independent computation, bad data, lm-eval's task index, where an export goes.
Evaluations of trained checkpoints and the CLI: tests/e2e/test_evaluate.py."""

import pytest
import torch
from helpers import make_examples, small_hf_model, write_jsonl
from torch.nn import functional as F

from evaluation import hellaswag as hs
from evaluation.hellaswag_data import HellaSwagDataError, read_examples
from training.hf import gpt_from_hf


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
