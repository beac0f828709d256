"""A token stream -> shards of `shard_tokens` tokens -> manifest.json: the one engine behind both ways to
prepare data, so that both write the same bytes. `pipeline.build` feeds it a source's tokenized documents
(one process, resumable from the sidecar each shard gets); `parts.assemble` feeds it the tokenized parts of a
job array. The format itself is common/shards.py; cutting the stream, data_prep/packer.py.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from common.errors import BadInput
from common.shards import read_manifest, write_manifest, write_shard
from common.tokenizer import EOT_TOKEN
from data_prep.packer import ShardPacker


class EmptySource(BadInput):
    """A source without a single document: there is nothing to write a shard of."""


Resume = tuple[
    int, int
]  # where the next shard starts in the source: (document index, token offset in it)


class ShardWriter:
    """Shards written in the background as the stream fills them (one writer thread: uploads and hashing
    overlap tokenization; at most two shard buffers wait on it). `records`: the shards already written (a
    resumed run's), which the next one follows. `sidecar(index, record, resume)`, when given, is called after
    each shard is stored, with where the next one starts. `max_shards` stops after that many shards."""

    def __init__(
        self,
        out_url: str,
        shard_tokens: int,
        prefix: str,
        records: list[dict[str, Any]] | None = None,
        sidecar: Callable[[dict[str, Any], Resume], None] | None = None,
        max_shards: int | None = None,
    ):
        self.out_url, self.prefix, self.sidecar = out_url, prefix, sidecar
        self.records = list(records or [])
        self.index = len(self.records)  # of the next shard
        self.max_shards = max_shards
        self.packer = ShardPacker(shard_tokens)
        self._pool = ThreadPoolExecutor(1)
        self._writes: list[Future] = []

    def add(
        self, toks: np.ndarray, pos: int = 0, resume: Callable[[int], Resume] | None = None
    ) -> None:
        """Take toks[pos:]; each shard it fills is written, with `resume(at)`: where the next shard starts,
        for the position `at` in toks where it does. Once max_shards are written, `stopped` and nothing
        more is taken."""
        if self.stopped:
            return
        for shard, at in self.packer.add(toks, pos):
            self._submit(shard, resume(at) if resume else (0, 0))
            if self.stopped:
                return

    @property
    def stopped(self) -> bool:
        """max_shards are written: nothing more is taken, and the store stays incomplete (no manifest)."""
        return self.max_shards is not None and self.index >= self.max_shards

    def finish(self, end: Resume, **manifest: Any) -> dict[str, Any] | None:
        """The remainder as the last shard (build-nanogpt writes it too), every write waited for, then
        manifest.json (with `manifest`'s fields) written last: the manifest, or None when stopped early by
        max_shards (no manifest: the store is not complete)."""
        stopped = (
            self.stopped
        )  # before the remainder, which may make it max_shards and is still complete
        if not stopped:
            rest = self.packer.rest()
            if rest is not None:
                self._submit(rest, end)
        self.close()
        if stopped:
            return None
        if not self.records:
            raise EmptySource(
                f"the source has no documents (empty dataset): {manifest.get('source')}"
            )
        write_manifest(self.out_url, self.records, eot_token=EOT_TOKEN, **manifest)
        return read_manifest(self.out_url)

    def close(self) -> None:
        """Wait for the writes in flight (their errors are raised here)."""
        try:
            while self._writes:
                self.records.append(self._writes.pop(0).result())
        finally:
            self._pool.shutdown()

    def _submit(self, tokens: np.ndarray, resume: Resume) -> None:
        while len(self._writes) >= 2:
            self.records.append(self._writes.pop(0).result())
        self._writes.append(self._pool.submit(self._store, self.index, tokens, resume))
        self.index += 1

    def _store(self, index: int, tokens: np.ndarray, resume: Resume) -> dict[str, Any]:
        rec = write_shard(self.out_url, index, tokens, self.prefix)
        if (
            self.sidecar is not None
        ):  # after the shard: a sidecar never points at a missing or partial one
            self.sidecar(rec, resume)
        return rec
