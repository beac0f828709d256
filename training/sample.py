"""Text generation: top-k / temperature sampling (greedy when temperature is 0), seeded and deterministic.

python -m training.sample --checkpoint URL | --hf DIR --prompt TEXT [--num-samples N] [--max-new-tokens M]
                          [--top-k K] [--temperature T] [--seed S] [--device cpu|cuda] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext

import torch
from torch.nn import functional as F

from common.cli import entry_point, non_negative_float, non_negative_int, positive_int
from common.errors import BadInput
from training.model import GPT, unwrap


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_ids: list[int],
    *,
    num_samples: int = 1,
    max_new_tokens: int = 32,
    top_k: int | None = 50,
    temperature: float = 1.0,
    seed: int = 42,
    autocast_dtype: torch.dtype | None = None,
) -> list[list[int]]:
    """Continue `prompt_ids` `num_samples` times; returns prompt + new tokens per sample.

    Runs the uncompiled module (a compiled one would recompile for every new length) with its own
    torch.Generator, so it neither depends on nor disturbs the global RNG that training resumes rely on."""
    if not prompt_ids:
        raise ValueError("the prompt must contain at least one token")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    gpt: GPT = unwrap(model)
    was_training = gpt.training
    gpt.eval()
    device = next(gpt.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    idx = (
        torch.tensor(prompt_ids, dtype=torch.long, device=device)
        .unsqueeze(0)
        .repeat(num_samples, 1)
    )
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    try:
        for _ in range(max_new_tokens):
            with amp:
                logits, _ = gpt(idx[:, -gpt.config.block_size :])
            logits = logits[
                :, -1, :
            ].float()  # real-vocabulary logits only: padding rows were sliced off
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    vals, cols = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)
                    choice = torch.multinomial(F.softmax(vals, dim=-1), 1, generator=gen)
                    nxt = torch.gather(cols, -1, choice)
                else:
                    nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=gen)
            idx = torch.cat((idx, nxt), dim=1)
    finally:
        gpt.train(was_training)
    return idx.tolist()


def sample_text(model, enc, prompt: str, **kw) -> list[str]:
    return [enc.decode(ids) for ids in generate(model, enc.encode(prompt), **kw)]


def _load(args) -> GPT:
    if args.hf:
        from training.hf import gpt_from_hf

        return gpt_from_hf(args.hf).to(args.device).eval()
    from training.checkpoint import load_model

    model, _, step = load_model(args.checkpoint, args.device)
    print(f"loaded {args.checkpoint} (step {step})", file=sys.stderr)
    return model


@entry_point
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m training.sample", description="Sample text from a GPT-2 model."
    )
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--checkpoint",
        help="checkpoint directory or run directory (latest checkpoint); any fsspec URL",
    )
    src.add_argument("--hf", help="local Hugging Face GPT-2 directory")
    ap.add_argument("--prompt", default="Hello, I'm a language model,")
    ap.add_argument("--num-samples", type=positive_int, default=4)
    ap.add_argument("--max-new-tokens", type=non_negative_int, default=32)
    ap.add_argument("--top-k", type=non_negative_int, default=50, help="0 = no top-k filtering")
    ap.add_argument("--temperature", type=non_negative_float, default=1.0, help="0 = greedy")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when there is one)"
    )
    ap.add_argument("--json", action="store_true", help="print a JSON list instead of text blocks")
    args = ap.parse_args(argv)
    from common.tokenizer import get_encoding
    from training.accel import pick_device

    args.device = str(pick_device(args.device))
    enc = get_encoding()
    if not enc.encode(args.prompt):
        raise BadInput("--prompt is empty: sampling continues a prompt of at least one token")
    model = _load(args)
    texts = sample_text(
        model,
        enc,
        args.prompt,
        num_samples=args.num_samples,
        max_new_tokens=args.max_new_tokens,
        top_k=args.top_k or None,
        temperature=args.temperature,
        seed=args.seed,
        autocast_dtype=torch.bfloat16 if args.device.startswith("cuda") else None,
    )
    if args.json:
        print(json.dumps(texts, indent=2))
    else:
        for i, t in enumerate(texts):
            print(f"--- sample {i}\n{t}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
