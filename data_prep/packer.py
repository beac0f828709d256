"""Cutting a token stream into shards: the one packer behind both the one-process pipeline and the job array's
assembly, so both write the same bytes (the format itself is common/shards.py)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from common.shards import DTYPE


class ShardPacker:
    """Consecutive shards of `size` tokens from a token stream (the last one, `rest()`, may be shorter)."""

    def __init__(self, size: int):
        self.size, self.fill = size, 0
        self.buf = np.empty(size, dtype=DTYPE)

    def add(self, toks: np.ndarray, pos: int = 0) -> Iterator[tuple[np.ndarray, int]]:
        """Copy toks[pos:] in; yields (full shard, position in toks where the next shard starts) per shard filled.
        Each yielded array is the packer's own, handed over (a new buffer is started), so it may be written later."""
        while pos < toks.size:
            take = min(toks.size - pos, self.size - self.fill)
            self.buf[self.fill : self.fill + take] = toks[pos : pos + take]
            self.fill, pos = self.fill + take, pos + take
            if self.fill == self.size:
                full, self.buf, self.fill = self.buf, np.empty(self.size, dtype=DTYPE), 0
                yield full, pos

    def rest(self) -> np.ndarray | None:
        return self.buf[: self.fill].copy() if self.fill else None
