"""Parallel GPT-2 tokenization of document batches, results in input order, bounded memory.

Each unit of work is a batch of documents, or a record of where to read them (a parquet row group: the
worker reads it, see data_prep/sources.py); a worker returns the batch's tokens as one uint16 array
([<|endoftext|>] + encode_ordinary(text) per document, concatenated) and the per-document token counts.
Compared with a pool over single documents (build-nanogpt), a batch costs one small pickle each way
instead of a list of Python ints per document, so the collecting process stays far from saturation.
The output depends only on the documents and their order, never on the number of workers.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import pickle
from collections.abc import Iterable, Iterator
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from common.errors import BadInput, ReproError
from common.shards import DTYPE
from common.tokenizer import EOT_TOKEN, VOCAB_SIZE, get_encoding

_enc = None
_MAX_ID = int(np.iinfo(DTYPE).max)  # the largest id a shard can hold


class TokenRangeError(BadInput, ValueError):
    """A token id that does not fit in uint16 (the shard dtype)."""


def _encoding():
    global _enc
    if _enc is None:
        _enc = get_encoding()
    return _enc


def to_uint16(tokens: list[int], where: str = "") -> np.ndarray:
    """Exact conversion: a token id outside 0..65535 is an error, never silently wrapped."""
    try:
        return np.array(tokens, dtype=DTYPE)
    except OverflowError:
        bad = next(t for t in tokens if not 0 <= t <= _MAX_ID)
        raise TokenRangeError(
            f"token id {bad} {where}does not fit in uint16 shards (GPT-2 ids are < {VOCAB_SIZE})"
        ) from None


def tokenize_texts(texts: Any, first_doc: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(tokens uint16, per-document token counts uint32) for a batch of documents."""
    if hasattr(texts, "read"):  # sources.ParquetRows: read here, in the worker
        texts = texts.read()
    if hasattr(texts, "to_pylist"):  # a pyarrow array straight from a parquet batch
        texts = texts.to_pylist()
    enc = _encoding()
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(
                f"document {first_doc + i}: text is {type(text).__name__}, not a string"
            )
    if not hasattr(enc, "encode_to_numpy"):  # tiktoken < 0.8
        return _tokenize_lists(enc, texts, first_doc)
    pieces, lens = [], np.empty(len(texts), dtype=np.uint32)
    for i, text in enumerate(texts):
        toks = encode_ordinary_array(enc, text)
        pieces.append(_EOT)
        pieces.append(toks)
        lens[i] = toks.size + 1
    flat = np.concatenate(pieces) if pieces else np.empty(0, dtype=np.uint32)
    if flat.size and int(flat.max()) > _MAX_ID:
        bad = int(np.argmax(flat > _MAX_ID))
        doc = first_doc + int(np.searchsorted(np.cumsum(lens), bad, side="right"))
        raise TokenRangeError(
            f"token id {int(flat[bad])} in document {doc} does not fit in uint16 shards "
            f"(GPT-2 ids are < {VOCAB_SIZE})"
        )
    return flat.astype(DTYPE), lens


_EOT = np.array([EOT_TOKEN], dtype=np.uint32)


def encode_ordinary_array(enc, text: str) -> np.ndarray:
    """encode_ordinary(text) as a uint32 array (tiktoken >= 0.8). encode_to_numpy with no special tokens
    allowed or checked is encode_ordinary (special-token text is ordinary text), returning tiktoken's buffer
    as an array: no list of Python ints per document."""
    return enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())


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


def _serve(tasks, results, cache_dir: str | None, inherited: list) -> None:
    """A worker: one unit in, its tokens out, until the task pipe closes."""
    for conn in inherited:  # the coordinator's pipe ends, copied by fork: else EOFs never come
        conn.close()
    try:
        _init(cache_dir)
    except BaseException as err:
        results.send(("error", _picklable(err)))
        return
    while True:
        try:
            unit = tasks.recv()
        except (EOFError, OSError):
            return
        try:
            results.send(("ok", _work(unit)))
        except BaseException as err:  # the coordinator re-raises it with its message
            results.send(("error", _picklable(err)))


def _picklable(err: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}")


def tokenize_units(
    units: Iterable[tuple[int, Any]], workers: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield (first_doc_index, tokens, lengths) per unit, in order, with `workers` processes (see _Pool)."""
    _encoding()  # fail here, clearly, if the BPE files are missing; also sets TIKTOKEN_CACHE_DIR for workers
    if workers <= 1:
        for first, texts in units:
            toks, lens = tokenize_texts(texts, first)
            yield first, toks, lens
        return
    pool = _Pool(workers, iter(units))
    try:
        while (result := pool.next_result()) is not None:
            first, tb, lb = result
            yield first, np.frombuffer(tb, dtype=DTYPE), np.frombuffer(lb, dtype=np.uint32)
    finally:
        pool.close()


class _Pool:
    """Worker processes that tokenize `units`, results handed back in input order.

    The coordinator stays lean so it does not become the bottleneck on a many-core node: no pool threads, one
    unit per worker at a time (a worker gets its next unit the moment its result is read, so a send never
    waits on a worker that is itself waiting to send), and at most 2 x workers + 1 units between the oldest
    one not yet handed back and the newest one handed out, so a streaming source is never read far ahead and
    memory stays bounded."""

    def __init__(self, workers: int, units: Iterator[tuple[int, Any]]):
        self.units, self.window = units, 2 * workers + 1
        self.procs: list[Any] = []
        self.tasks: list[Connection] = []  # the coordinator's end of each worker's task pipe
        self.results: list[Connection] = []  # ... and of its result pipe
        self.busy: dict[int, int] = {}  # worker -> sequence number of the unit it holds
        self.done: dict[
            int, tuple[int, bytes, bytes]
        ] = {}  # sequence number -> result, not yet handed back
        self.sent = self.handed_back = 0
        self.exhausted = False
        try:
            self._start(workers)
        except BaseException:
            self.close()
            raise
        self.idle = list(range(workers))
        self._hand_out()

    def _start(self, workers: int) -> None:
        # fork: workers start at once and need no importable __main__. They are started before the first
        # unit is read and before this module starts any thread (the shard writer starts with the first
        # full shard).
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)
        cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR")
        for _ in range(workers):
            task_r, task_w = ctx.Pipe(duplex=False)
            result_r, result_w = ctx.Pipe(duplex=False)
            parent_ends = [
                *self.tasks,
                *self.results,
                task_w,
                result_r,
            ]  # copied into the child by fork
            proc = ctx.Process(
                target=_serve, args=(task_r, result_w, cache_dir, parent_ends), daemon=True
            )
            proc.start()
            task_r.close()
            result_w.close()
            self.procs.append(proc)
            self.tasks.append(task_w)
            self.results.append(result_r)

    def next_result(self) -> tuple[int, bytes, bytes] | None:
        """The next unit's result in input order; None once every unit is done."""
        while self.handed_back not in self.done:
            if not self.busy:
                return None
            self._collect()
            self._hand_out()  # the freed workers start on their next unit at once
        result = self.done.pop(self.handed_back)
        self.handed_back += 1
        self._hand_out()
        return result

    def _hand_out(self) -> None:
        while self.idle and not self.exhausted and self.sent - self.handed_back < self.window:
            unit = next(self.units, None)
            if unit is None:
                self.exhausted = True
                return
            w = self.idle.pop()
            self.tasks[w].send(unit)
            self.busy[w] = self.sent
            self.sent += 1

    def _collect(self) -> None:
        """The results of the workers that have one ready (blocks until one does)."""
        ready = mp_connection.wait([self.results[w] for w in self.busy])
        for conn in ready:
            w = self.results.index(conn)  # type: ignore[arg-type]
            try:
                status, payload = self.results[w].recv()
            except EOFError:
                self.procs[w].join(1)
                raise ReproError(
                    f"a tokenizer worker died (exit code {self.procs[w].exitcode}); out of memory?"
                ) from None
            if status == "error":
                raise payload
            self.done[self.busy.pop(w)] = payload
            self.idle.append(w)

    def close(self) -> None:
        for conn in self.tasks:
            conn.close()  # a worker waiting for a task sees EOF and exits
        for (
            w
        ) in self.busy:  # stopped early (an error, or the consumer closed us): nobody reads those
            self.procs[w].terminate()
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.results:
            conn.close()
