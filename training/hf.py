"""Hugging Face GPT-2 weight import and export (this module imports the model, never the other way round).

Our parameter names equal HF's; the differences are (1) HF's Conv1D stores (in, out) where nn.Linear
stores (out, in), (2) our embedding/lm_head rows are padded to `padded_vocab_size`, and (3) HF may carry
non-parameter buffers (`attn.bias`, `attn.masked_bias`) in older checkpoints.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from common import tokenizer
from common.errors import BadInput
from training.config import GPTConfig
from training.model import GPT, unwrap

# What export_hf_dir writes (a folder holding only these is an earlier export, which may be overwritten).
EXPORT_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "vocab.json",
        "merges.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
)

# Weights that HF stores as Conv1D (transposed relative to nn.Linear).
_CONV1D_SUFFIXES = (
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)


def _is_conv1d(name: str) -> bool:
    return name.endswith(_CONV1D_SUFFIXES)


def _load_hf_model(model_or_dir):
    from transformers import GPT2LMHeadModel

    if isinstance(model_or_dir, (str, Path)):
        path = Path(model_or_dir)
        if not (path / "config.json").exists():
            raise BadInput(f"{path} is not a Hugging Face model directory (no config.json)")
        return GPT2LMHeadModel.from_pretrained(str(path), local_files_only=True)
    return model_or_dir


def gpt_from_hf(model_or_dir, pad_vocab_to: int = 64) -> GPT:
    """Our model with Hugging Face GPT-2 weights: a GPT2LMHeadModel object or a local HF directory."""
    hf = _load_hf_model(model_or_dir)
    c = hf.config
    if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(
            f"unsupported activation {c.activation_function!r}: GPT-2 uses tanh GELU (gelu_new)"
        )
    if abs(c.layer_norm_epsilon - 1e-5) > 1e-12:
        raise ValueError(
            f"unsupported layer_norm_epsilon {c.layer_norm_epsilon}: our LayerNorms use 1e-5"
        )
    config = GPTConfig(
        block_size=c.n_positions,
        vocab_size=c.vocab_size,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_embd=c.n_embd,
        pad_vocab_to=pad_vocab_to,
    )
    model = GPT(config)
    ours = model.state_dict()
    theirs = {
        k: v
        for k, v in hf.state_dict().items()
        if not k.endswith((".attn.bias", ".attn.masked_bias"))
    }
    missing = set(ours) - set(theirs)
    unexpected = set(theirs) - set(ours)
    if missing or unexpected:
        raise ValueError(
            f"HF GPT-2 state dict mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    with torch.no_grad():
        for name, src in theirs.items():
            dst = ours[name]
            src = src.t() if _is_conv1d(name) else src
            if name in ("transformer.wte.weight", "lm_head.weight"):
                dst.zero_()  # padding rows stay zero: they are never an input and are sliced off the output
                dst[: src.shape[0]].copy_(src)
            else:
                if dst.shape != src.shape:
                    raise ValueError(
                        f"{name}: shape {tuple(src.shape)} does not match ours {tuple(dst.shape)}"
                    )
                dst.copy_(src)
    return model


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights in HF GPT-2 layout: Conv1D transposes, padding rows dropped, tied head written once."""
    model = unwrap(model)
    vocab = model.config.vocab_size
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # HF ties it to transformer.wte.weight
        t = t.detach().to("cpu", torch.float32)
        if name == "transformer.wte.weight":
            t = t[:vocab]
        out[name] = (t.t() if _is_conv1d(name) else t).contiguous()
    return out


def hf_config(config: GPTConfig):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.block_size,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.EOT_TOKEN,
        eos_token_id=tokenizer.EOT_TOKEN,
        architectures=["GPT2LMHeadModel"],
    )


class NotGPT2Shaped(BadInput, ValueError):
    """A model with the fast recipe's architecture switches: no Hugging Face GPT-2 can hold it."""


def check_gpt2_shaped(config: GPTConfig) -> None:
    """Raise NotGPT2Shaped, naming the switches, for a model a Hugging Face GPT-2 cannot hold."""
    other = config.not_gpt2()
    if other:
        raise NotGPT2Shaped(
            f"this checkpoint is not GPT-2-shaped ({', '.join(other)}): a Hugging Face GPT-2 cannot hold it; "
            "evaluate it with this project's own HellaSwag scorer (python -m evaluation.evaluate --tasks hellaswag)"
        )


def to_hf(model: GPT):
    """A transformers GPT2LMHeadModel holding our weights (fp32)."""
    from transformers import GPT2LMHeadModel

    model = unwrap(model)
    check_gpt2_shaped(model.config)
    hf = GPT2LMHeadModel(hf_config(model.config))
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    # lm_head.weight is tied to wte; older transformers list the attention-mask buffers as missing.
    missing = [
        k
        for k in missing
        if k != "lm_head.weight" and not k.endswith((".attn.bias", ".attn.masked_bias"))
    ]
    if missing or unexpected:
        raise ValueError(f"export mismatch: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return hf.eval()


def write_hf_tokenizer(out_dir: str | Path) -> None:
    """Write GPT-2 tokenizer files that `transformers.AutoTokenizer.from_pretrained(out_dir)` loads offline.
    encoder.json and vocab.bpe are HF's vocab.json and merges.txt under other names."""
    from transformers import GPT2Tokenizer

    tokenizer.get_encoding()  # makes sure the staged cache is in use and valid
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # vocab.json + merges.txt stay in the export for slow tokenizers and older transformers; tokenizer.json
    # (the fast tokenizer) is written by save_pretrained. Loading from a directory behaves the same in 4 and 5.
    shutil.copyfile(tokenizer.cached_file("encoder.json"), out / "vocab.json")
    shutil.copyfile(tokenizer.cached_file("vocab.bpe"), out / "merges.txt")
    tok = GPT2Tokenizer.from_pretrained(str(out), local_files_only=True, model_max_length=1024)
    tok.save_pretrained(str(out))


def export_hf_dir(model: GPT, out_dir: str | Path, with_tokenizer: bool = True) -> Path:
    """Write a directory that `GPT2LMHeadModel.from_pretrained` and `AutoTokenizer.from_pretrained` load as is."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    to_hf(model).save_pretrained(str(out), safe_serialization=True)
    if with_tokenizer:
        write_hf_tokenizer(out)
    return out
