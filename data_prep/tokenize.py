"""Parallel GPT-2 tokenization of document batches, results in input order, bounded memory.

Each unit of work is a batch of documents; a worker returns the batch's tokens as one uint16 array
([<|endoftext|>] + encode_ordinary(text) per document, concatenated) and the per-document token counts.
Compared with a pool over single documents (build-nanogpt), a batch costs one small pickle each way
instead of a list of Python ints per document, so the collecting process stays far from saturation.
The output depends only on the documents and their order, never on the number of workers.
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import os
from typing import Any, Iterable, Iterator

import numpy as np

from training.tokenizer import EOT_TOKEN, get_encoding

_enc = None


class TokenRangeError(ValueError):
    """A token id that does not fit in uint16 (the shard dtype)."""


def _encoding():
    global _enc
    if _enc is None:
        _enc = get_encoding()
    return _enc


def to_uint16(tokens: list[int], where: str = "") -> np.ndarray:
    """Exact conversion: a token id outside 0..65535 is an error, never silently wrapped."""
    try:
        return np.array(tokens, dtype=np.uint16)
    except OverflowError:
        bad = next(t for t in tokens if not 0 <= t < 2**16)
        raise TokenRangeError(f"token id {bad} {where}does not fit in uint16 shards (GPT-2 ids are < 50257)") from None


def tokenize_texts(texts: Any, first_doc: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(tokens uint16, per-document token counts uint32) for a batch of documents."""
    if hasattr(texts, "to_pylist"):  # a pyarrow array straight from a parquet batch
        texts = texts.to_pylist()
    enc = _encoding()
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"document {first_doc + i}: text is {type(text).__name__}, not a string")
    if not hasattr(enc, "encode_to_numpy"):  # tiktoken < 0.8
        return _tokenize_lists(enc, texts, first_doc)
    # encode_to_numpy with no special tokens allowed or checked is encode_ordinary (special-token text is
    # ordinary text), returning tiktoken's buffer as an array: no list of Python ints per document
    pieces, lens = [], np.empty(len(texts), dtype=np.uint32)
    for i, text in enumerate(texts):
        toks = enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
        pieces.append(_EOT)
        pieces.append(toks)
        lens[i] = toks.size + 1
    flat = np.concatenate(pieces) if pieces else np.empty(0, dtype=np.uint32)
    if flat.size and int(flat.max()) >= 2**16:
        bad = int(np.argmax(flat >= 2**16))
        doc = first_doc + int(np.searchsorted(np.cumsum(lens), bad, side="right"))
        raise TokenRangeError(f"token id {int(flat[bad])} in document {doc} does not fit in uint16 shards "
                              f"(GPT-2 ids are < 50257)")
    return flat.astype(np.uint16), lens


_EOT = np.array([EOT_TOKEN], dtype=np.uint32)


def _tokenize_lists(enc, texts, first_doc: int) -> tuple[np.ndarray, np.ndarray]:
    flat: list[int] = []
    lens = np.empty(len(texts), dtype=np.uint32)
    for i, text in enumerate(texts):
        toks = enc.encode_ordinary(text)
        flat.append(EOT_TOKEN)
        flat.extend(toks)
        lens[i] = len(toks) + 1
    return to_uint16(flat, f"in documents {first_doc}..{first_doc + len(texts) - 1} "), lens


def _work(unit: tuple[int, Any]) -> tuple[int, bytes, bytes]:
    first, texts = unit
    toks, lens = tokenize_texts(texts, first)
    return first, toks.tobytes(), lens.tobytes()  # raw bytes: the cheapest thing to pickle back


def _init(cache_dir: str | None) -> None:
    if cache_dir:
        os.environ["TIKTOKEN_CACHE_DIR"] = cache_dir
    _encoding()


def tokenize_units(units: Iterable[tuple[int, Any]], workers: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield (first_doc_index, tokens, lengths) per unit, in order. At most ~2 units per worker are in flight,
    so a streaming source is never read far ahead (multiprocessing's imap would queue the whole input)."""
    _encoding()  # fail here, clearly, if the BPE files are missing; also sets TIKTOKEN_CACHE_DIR for workers
    if workers <= 1:
        for first, texts in units:
            toks, lens = tokenize_texts(texts, first)
            yield first, toks, lens
        return
    # fork: workers start at once and need no importable __main__; the pool is created before this module
    # starts any thread of its own (the shard writer thread starts with the first full shard)
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)
    with ctx.Pool(workers, initializer=_init, initargs=(os.environ.get("TIKTOKEN_CACHE_DIR"),)) as pool:
        pending: collections.deque = collections.deque()
        it = iter(units)
        exhausted = False
        while True:
            while not exhausted and len(pending) < 2 * workers + 1:
                unit = next(it, None)
                if unit is None:
                    exhausted = True
                else:
                    pending.append(pool.apply_async(_work, (unit,)))
            if not pending:
                return
            first, tb, lb = pending.popleft().get()
            yield first, np.frombuffer(tb, dtype=np.uint16), np.frombuffer(lb, dtype=np.uint32)
