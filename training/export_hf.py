"""Export a checkpoint to a Hugging Face GPT-2 directory (config.json, model.safetensors, tokenizer files)
that `GPT2LMHeadModel.from_pretrained`, `AutoTokenizer.from_pretrained` and lm-eval's `hf` model load as is.

    python -m training.export_hf --checkpoint URL --out DIR
"""

from __future__ import annotations

import argparse

from common.cli import entry_point
from common.outputs import claim_folder
from training.checkpoint import load_model
from training.hf import EXPORT_FILES, check_gpt2_shaped, export_hf_dir


@entry_point
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m training.export_hf", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint directory or run directory (latest); fsspec URL",
    )
    ap.add_argument("--out", required=True, help="output directory (local)")
    ap.add_argument(
        "--no-tokenizer", action="store_true", help="skip writing the GPT-2 tokenizer files"
    )
    ap.add_argument(
        "--force", action="store_true", help="write into --out although it holds other files"
    )
    args = ap.parse_args(argv)
    model, _, step = load_model(args.checkpoint)
    check_gpt2_shaped(model.config)  # before the output folder is touched
    claim_folder(
        args.out, ours=EXPORT_FILES.__contains__, what="a Hugging Face export", force=args.force
    )
    out = export_hf_dir(model, args.out, with_tokenizer=not args.no_tokenizer)
    print(f"exported step {step} of {args.checkpoint} to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
