"""Token-shard loader: rank-strided batches over the shards of common/shards.py, resumable and verified.

Batches: every rank reads B*T+1 tokens at `base + rank*B*T` and the window advances by B*T*world per
micro-step, exactly as build-nanogpt's DataLoaderLite; at the end of a shard the next one is taken (already
fetched by a background thread), and after the last shard the next epoch starts. The loader's global state
(shard, base position, epoch) is the same on every rank, so a run can resume on a different world size.

With `align_docs` (the fast recipe's), every row starts at a document's first token (the end-of-text that opens
it): a micro-step's B*world rows are taken one after the other from the base position, each at the first
end-of-text at or after the end of the previous row, and rank r keeps rows r*B..r*B+B-1. Tokens between a
row's end and the next document's start are passed over. An optimizer step (`step_rows` rows over all
ranks and micro-steps) starts in the next shard when it would not fit whole in this one, so the rows of every
step are the same at any world size. The state is the same base position.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from common.shards import ShardError, list_shards, load_shard
from common.tokenizer import EOT_TOKEN

log = logging.getLogger(__name__)


class ShardLoader:
    """Rank-strided (B, T) batches over a split's shards, with a state that round-trips exactly."""

    def __init__(
        self,
        data_url: str,
        split: str,
        B: int,
        T: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        verify: bool = True,
        prefetch: bool = True,
        vocab_size: int | None = None,
        align_docs: bool = False,
        step_rows: int | None = None,
    ):
        """`vocab_size`: the model's real vocabulary; a token id at or past it (a padded row, or no GPT-2 token
        at all) is bad data, named by shard and offset when its shard is read, not a non-finite loss later."""
        self.vocab_size = vocab_size
        self.shards = list_shards(data_url, split)
        self.split, self.B, self.T = split, B, T
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed, self.verify = shuffle, seed, verify
        if align_docs and shuffle:
            raise ValueError("document-aligned rows are read in order: no shuffling with them")
        self.align_docs = align_docs
        self.step_rows = (
            step_rows or B * world_size
        )  # rows of one optimizer step, all ranks together
        self._rows_in_step = 0  # of the current optimizer step, read so far (aligned rows)
        self._eot = np.zeros(
            0, dtype=np.int64
        )  # the current shard's end-of-text positions (aligned rows)
        need = B * T * world_size + 1
        for s in self.shards:
            if s.tokens is not None and s.tokens < need:
                raise ShardError(
                    f"shard {s.name} has {s.tokens} tokens; one step needs {need} (B*T*world+1)"
                )
        self._pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-prefetch")
            if prefetch
            else None
        )
        self._next: tuple[int, int, Future] | None = None  # (epoch, slot) -> future of tokens
        self.epoch = 0
        self.slot = 0  # index into this epoch's shard order
        self.base = 0  # rank 0's offset in the current shard; rank r reads at base + r*B*T
        self._loaded: int | None = None
        self._load_current()

    # -- order ------------------------------------------------------------------------------------------
    def _order(self, epoch: int) -> list[int]:
        idx = list(range(len(self.shards)))
        if self.shuffle:
            np.random.default_rng([self.seed, epoch]).shuffle(idx)
        return idx

    def _blocks(self, n_tokens: int) -> np.ndarray | None:
        """With shuffling on, the order in which the shard's step-sized windows are visited."""
        if not self.shuffle:
            return None
        n = (n_tokens - 1) // (self.B * self.T * self.world_size)
        return np.random.default_rng([self.seed, self.epoch, self.slot, 1]).permutation(n)

    def _fetch(self, epoch: int, slot: int) -> np.ndarray:
        shard = self.shards[self._order(epoch)[slot]]
        tokens = load_shard(shard, self.verify)
        if tokens.size < self.B * self.T * self.world_size + 1:
            raise ShardError(
                f"shard {shard.name} has {tokens.size} tokens; "
                f"one step needs {self.B * self.T * self.world_size + 1}"
            )
        if self.vocab_size is not None and tokens.size and int(tokens.max()) >= self.vocab_size:
            at = int(np.argmax(tokens >= self.vocab_size))
            raise ShardError(
                f"shard {shard.name} holds token id {int(tokens[at])} at offset {at}, past the model's "
                f"vocabulary of {self.vocab_size}: not GPT-2 tokens (bad data, or another tokenizer's)"
            )
        return tokens

    def _following(self, epoch: int, slot: int) -> tuple[int, int]:
        return (epoch, slot + 1) if slot + 1 < len(self.shards) else (epoch + 1, 0)

    def _load_current(self) -> None:
        key = (self.epoch, self.slot)
        idx = self._order(self.epoch)[self.slot]
        if idx != self._loaded:  # a single unshuffled shard stays in memory across epochs
            if self._next is not None and self._next[:2] == key:
                self.tokens = self._next[2].result()
            else:
                self.tokens = self._fetch(*key)
            self._loaded = idx
            if self.align_docs:
                self._eot = np.flatnonzero(self.tokens == EOT_TOKEN)
                self._say_what_alignment_passes_over(idx)
        self._blocks_order = self._blocks(self.tokens.size)
        if self.align_docs and self._aligned_rows(0, self.step_rows) is None:
            raise ShardError(
                f"shard {self.shards[idx].name} has no room for one step of document-aligned rows "
                f"({self.B * self.world_size} rows of {self.T + 1} tokens, each starting at an end-of-text)"
            )
        nxt = self._following(*key)
        self._next = None
        if self._pool is not None and self._order(nxt[0])[nxt[1]] != idx:
            self._next = (*nxt, self._pool.submit(self._fetch, *nxt))

    def _say_what_alignment_passes_over(self, idx: int) -> None:
        """Aligned rows read at most one row per document: with documents much longer than a row, most of the
        text is never read and an epoch is a few rows, memorised soon. Said once per run, with the remedy."""
        reads = min(1.0, self._eot.size * (self.T + 1) / max(self.tokens.size, 1))
        if reads < 0.5 and not getattr(self, "_said_coverage", False):
            self._said_coverage = True
            log.warning(
                "document-aligned rows read at most %.0f%% of shard %s: its documents (%d tokens on average) "
                "are longer than a row (%d tokens) and the rest of each is passed over; "
                "data.align_docs=false reads them whole",
                100 * reads,
                self.shards[idx].name,
                self.tokens.size // max(self._eot.size, 1),
                self.T + 1,
            )

    # -- batches ----------------------------------------------------------------------------------------
    def _aligned_rows(self, base: int, n: int) -> tuple[list[int], int] | None:
        """The starts of `n` rows from `base` (each at an end-of-text) and where the last one ends; None when
        the shard has no room left for them."""
        starts, cursor = [], base
        for _ in range(n):
            i = int(np.searchsorted(self._eot, cursor))
            if i >= self._eot.size or int(self._eot[i]) + self.T + 1 > self.tokens.size:
                return None
            start = int(self._eot[i])
            starts.append(start)
            cursor = start + self.T  # the row's last target may open the next document
        return starts, cursor

    def _fits(self, base: int) -> bool:
        if self.align_docs:  # a whole optimizer step, when one starts here
            left = self.step_rows - self._rows_in_step if self._rows_in_step else self.step_rows
            return self._aligned_rows(base, left) is not None
        return base + self.B * self.T * self.world_size + 1 <= self.tokens.size

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) as uint16 CPU tensors of shape (B, T); widen them on the device (`.long()` after `.to`)."""
        if self.align_docs:
            step = self._aligned_rows(self.base, self.B * self.world_size)
            assert step is not None  # _advance and load_state_dict leave base where a step fits
            mine = step[0][self.rank * self.B : (self.rank + 1) * self.B]
            rows = torch.from_numpy(np.stack([self.tokens[s : s + self.T + 1] for s in mine]))
            self._advance()
            return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
        B, T, stride = self.B, self.T, self.B * self.T * self.world_size
        base = self.base
        if self._blocks_order is not None:
            base = int(self._blocks_order[self.base // stride]) * stride
        start = base + B * T * self.rank
        buf = torch.from_numpy(self.tokens[start : start + B * T + 1].copy())
        x, y = buf[:-1].view(B, T), buf[1:].view(B, T)
        self._advance()
        return x, y

    def skip(self, micro_steps: int) -> None:
        """Pass over `micro_steps` batches exactly as if they had been read (the data a rollback leaves out)."""
        for _ in range(micro_steps):
            self._advance()

    def _advance(self) -> None:
        if self.align_docs:
            step = self._aligned_rows(self.base, self.B * self.world_size)
            self.base = step[1] if step is not None else self.tokens.size
            self._rows_in_step = (self._rows_in_step + self.B * self.world_size) % self.step_rows
        else:
            self.base += self.B * self.T * self.world_size
        if not self._fits(self.base):
            self.epoch, self.slot = self._following(self.epoch, self.slot)
            self._load_current()
            self.base = 0

    def reset(self) -> None:
        """Back to the first batch of epoch 0 (validation reads the same batches every time)."""
        if (self.epoch, self.slot) != (0, 0):
            self.epoch, self.slot = 0, 0
            self._load_current()
        self.base = 0

    # -- state ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "epoch": self.epoch,
            "slot": self.slot,
            "base": self.base,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "num_shards": len(self.shards),
            "B": self.B,
            "T": self.T,
            "world_size": self.world_size,
            "align_docs": self.align_docs,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position. `base` is the same on every rank, so a state saved under another world size
        (or micro-batch) still resumes at the same place in the token stream, rounded down to a step boundary."""
        if state["num_shards"] != len(self.shards) or state["split"] != self.split:
            raise ShardError(
                f"loader state is for {state['num_shards']} {state['split']} shards, the data has "
                f"{len(self.shards)} {self.split} shards: the dataset changed since the checkpoint"
            )
        self.shuffle, self.seed = bool(state["shuffle"]), int(state["seed"])
        self.epoch, self.slot = int(state["epoch"]), int(state["slot"])
        self._load_current()
        stride = self.B * self.T * self.world_size
        base = int(state["base"])
        if self.align_docs != bool(state.get("align_docs", False)):
            raise ShardError(
                "the checkpoint's loader read "
                + ("document-aligned rows" if state.get("align_docs") else "the plain token stream")
                + f", this run reads {'document-aligned rows' if self.align_docs else 'the plain stream'}: "
                "set data.align_docs as the run had it"
            )
        changed = (state["B"], state["T"], state["world_size"]) != (self.B, self.T, self.world_size)
        if changed and not self.align_docs:  # aligned steps start wherever the last one ended
            base -= base % stride
            if self._blocks_order is not None and base:
                log.warning(
                    "shuffled loader resumed with a different batch layout: restarting this shard"
                )
                base = 0
        if not self._fits(base):
            self.epoch, self.slot = self._following(self.epoch, self.slot)
            self._load_current()
            base = 0
        self.base = base

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
