"""What fails a run in its first second instead of hours in: the data can be read, the run directory written,
the tokenizer files are there when the run samples. Runs before a model is built or a GPU is touched."""

from __future__ import annotations

from common import store
from common.shards import check_sizes, list_shards
from training.config import RunConfig


def preflight(cfg: RunConfig) -> None:
    """Raises a BadInput (StoreError, ShardError, TokenizerFilesError) naming what is wrong."""
    store.preflight(cfg.data.url, write=False)
    list_shards(cfg.data.url, "train")
    list_shards(cfg.data.url, "val")
    check_sizes(cfg.data.url)
    store.preflight(cfg.train.run_dir, write=True)
    if cfg.eval.sample_every:
        from common.tokenizer import get_encoding

        get_encoding()  # sampling needs the BPE files: fail now, not at the first sample hours in
