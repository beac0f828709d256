"""The token-shard format, writer side: build-nanogpt's layout, byte for byte.

A shard is `np.save` of a 1-D uint16 array; names are `{prefix}_{split}_{index:06d}.npy`, index 0 being the
val shard and 1.. the train shards. `manifest.json`, written after the shards, lists every shard with its
token count and sha256; the training loader trusts it and verifies against it.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any, Iterable

import numpy as np

from training import store

PREFIX = "edufineweb"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "gpt2-repro-shards/1"


def shard_name(split: str, index: int, prefix: str = PREFIX) -> str:
    return f"{prefix}_{split}_{index:06d}.npy"


class ShardPacker:
    """Cuts a token stream into consecutive shards of `size` tokens (the last one, `rest()`, may be shorter)."""

    def __init__(self, size: int):
        self.size, self.fill = size, 0
        self.buf = np.empty(size, dtype=np.uint16)

    def add(self, toks: np.ndarray, pos: int = 0):
        """Copy toks[pos:] in; yields (full shard, position in toks where the next shard starts) per shard filled.
        Each yielded array is the packer's own, handed over (a new buffer is started), so it may be written later."""
        while pos < toks.size:
            take = min(toks.size - pos, self.size - self.fill)
            self.buf[self.fill:self.fill + take] = toks[pos:pos + take]
            self.fill, pos = self.fill + take, pos + take
            if self.fill == self.size:
                full, self.buf, self.fill = self.buf, np.empty(self.size, dtype=np.uint16), 0
                yield full, pos

    def rest(self) -> np.ndarray | None:
        return self.buf[:self.fill].copy() if self.fill else None


def shard_bytes(tokens: np.ndarray) -> bytes:
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise ValueError(f"shards hold 1-D uint16 tokens, got {tokens.dtype} {tokens.shape}")
    buf = io.BytesIO()
    np.save(buf, tokens)  # what build-nanogpt's write_datafile does (np.save to an open file)
    return buf.getvalue()


def write_shard(data_url: str, name: str, tokens: np.ndarray) -> dict[str, Any]:
    data = shard_bytes(tokens)
    store.write_bytes(store.join(data_url, name), data)
    return {"name": name, "tokens": int(tokens.size), "sha256": hashlib.sha256(data).hexdigest()}


def write_manifest(data_url: str, shards: Iterable[dict[str, Any]], **meta: Any) -> None:
    shards = list(shards)
    store.write_json(store.join(data_url, MANIFEST), {
        "format": MANIFEST_FORMAT,
        "tokenizer": "gpt2",
        "dtype": "uint16",
        "shards": shards,
        "total_tokens": sum(s["tokens"] for s in shards),
        **meta,
    })
