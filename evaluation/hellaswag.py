"""HellaSwag scored as in build-nanogpt: each of the 4 endings is rendered as context + " " + ending, scored by
the cross-entropy of the ending tokens only; `acc` picks the lowest summed loss, `acc_norm` the lowest mean
loss per token. (lm-eval's acc_norm divides by the ending's byte length instead, hence its higher 0.3114.)

Input: examples as evaluation/hellaswag_data.py reads them from HellaSwag's jsonl. Runs on CPU or GPU, and
split over ranks under torchrun.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from evaluation.hellaswag_data import HellaSwagDataError

# Reference points on the full validation set (10,042 examples).
GPT2_124M_ACC_NORM = 0.2955  # OpenAI's GPT-2 124M weights scored by this method
GPT3_125M_ACC = 0.337  # the GPT-3 paper's 125M model
REFERENCES = {
    "gpt2-124m (OpenAI weights, this method: acc_norm)": GPT2_124M_ACC_NORM,
    "gpt2-124m (OpenAI weights, lm-eval acc_norm)": 0.3114,
    "gpt3-125m (paper, acc)": GPT3_125M_ACC,
}


@dataclass
class Rendered:
    tokens: torch.Tensor  # (4, L) context + ending, zero padded
    mask: torch.Tensor  # (4, L) 1 where the token belongs to the ending
    label: int


def render(example: dict[str, Any], enc) -> Rendered:
    ctx = enc.encode(example["ctx"])
    rows, masks = [], []
    for ending in example["endings"]:
        end = enc.encode(" " + ending)  # GPT-2's BPE carries the space at the start of the word
        rows.append(ctx + end)
        masks.append([0] * len(ctx) + [1] * len(end))
    width = max(len(r) for r in rows)
    tokens = torch.zeros((4, width), dtype=torch.long)
    mask = torch.zeros((4, width), dtype=torch.long)
    for i, (r, m) in enumerate(zip(rows, masks)):
        tokens[i, : len(r)] = torch.tensor(r)
        mask[i, : len(m)] = torch.tensor(m)
    return Rendered(tokens, mask, int(example["label"]))


@torch.no_grad()
def ending_losses(
    model, r: Rendered, device, autocast_dtype=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, mean) cross-entropy of each ending's tokens given the context: two tensors of shape (4,)."""
    tokens, mask = r.tokens.to(device), r.mask.to(device)
    if autocast_dtype is not None:
        with torch.autocast(device.type, dtype=autocast_dtype):
            logits, _ = model(tokens)
    else:
        logits, _ = model(tokens)
    logits = logits[:, :-1, :].float()
    targets = tokens[:, 1:]
    losses = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none"
    )
    losses = losses.view(tokens.size(0), -1)
    m = mask[:, 1:].float()  # the loss at position t predicts token t+1
    total = (losses * m).sum(dim=1)
    return total, total / m.sum(dim=1)


def evaluate(
    model,
    examples: list[dict[str, Any]],
    enc,
    device,
    autocast_dtype=None,
    progress: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Any]:
    """acc, acc_norm and n over `examples`; rank r scores examples r, r+world, ... and counts are summed."""
    from tqdm import tqdm

    model.eval()
    counts = torch.zeros(3, dtype=torch.float64)  # correct (sum), correct (mean), n
    mine = list(range(rank, len(examples), world_size))
    for i in tqdm(mine, desc="hellaswag", unit="ex", disable=not progress):
        r = render(examples[i], enc)
        if r.tokens.size(1) > model.config.block_size:
            raise HellaSwagDataError(f"example {i} is {r.tokens.size(1)} tokens, over block_size")
        total, mean = ending_losses(model, r, device, autocast_dtype)
        counts += torch.tensor(
            [int(total.argmin()) == r.label, int(mean.argmin()) == r.label, 1], dtype=torch.float64
        )
    if world_size > 1:
        counts = counts.to(device)
        torch.distributed.all_reduce(counts)
        counts = counts.cpu()
    correct, correct_norm, n = counts.tolist()
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": int(n)}
