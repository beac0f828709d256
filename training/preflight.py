"""What fails a run in its first second instead of hours in: the data can be read, the run directory written,
the tokenizer files are there when the run samples. Runs before a model is built or a GPU is touched."""

from __future__ import annotations

from common import store
from common.layout import RunDir
from common.outputs import claim_folder
from common.shards import check_sizes, list_shards
from training.config import RunConfig


def preflight(cfg: RunConfig, force: bool = False) -> None:
    """Raises a BadInput (StoreError, ShardError, TokenizerFilesError) naming what is wrong. The run directory
    must be new, empty or a run directory (only what the project writes there), unless `force`."""
    store.preflight(cfg.data.url, write=False)
    list_shards(cfg.data.url, "train")
    list_shards(cfg.data.url, "val")
    check_sizes(cfg.data.url)
    claim_folder(cfg.train.run_dir, ours=RunDir.is_ours, what="a run directory", force=force)
    store.preflight(cfg.train.run_dir, write=True)
    if cfg.eval.sample_every:
        from common.tokenizer import get_encoding

        get_encoding()  # sampling needs the BPE files: fail now, not at the first sample hours in
