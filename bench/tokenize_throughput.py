"""Tokenization throughput of data_prep against build-nanogpt's fineweb.py approach, same corpus, same cores.

    python bench/tokenize_throughput.py                       # ~10M tokens, all cores (small: a smoke run)
    python bench/tokenize_throughput.py --tokens 200e6 --repeats 3   # a real measurement

Corpus: generated dictionary-word documents (seeded). Both pipelines write shards to a temporary folder:
  reference  multiprocessing.Pool(K).imap(tokenize, docs, chunksize=16), encode_ordinary per document,
             one collecting process filling the shard buffer (build-nanogpt's loop);
  ours       data_prep.pipeline.build with K workers, including what it adds (resume sidecars, sha256s,
             manifest).
  ceiling    K processes tokenizing K slices of the corpus with no coordination at all (no IPC, no
             collector, no writes): the most K cores of this machine give, since cores slow each other down
             through shared caches, memory bandwidth and the hypervisor.
Prints tokens/s of each, the ratio, and parallel efficiency = tokens/s / (K x single-thread tokens/s), and for
ours also the fraction of the ceiling reached.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_prep import pipeline  # noqa: E402
from data_prep.sources import TextsSource  # noqa: E402
from training.tokenizer import get_encoding  # noqa: E402

_enc = None


def make_corpus(n_tokens: int, seed: int = 0) -> list[str]:
    """Documents of 50..2000 words drawn from a fixed pseudo-dictionary (~3 GPT-2 tokens per word)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, rng.integers(2, 9))) for _ in range(20_000)]
    vocab += "the of and to in is was for that on as with by at from it this which are".split() * 200
    docs, words = [], 0
    while words * 3 < n_tokens:
        n = int(rng.integers(50, 2000))
        idx = rng.integers(0, len(vocab), n)
        docs.append(" ".join(vocab[i] for i in idx) + ".")
        words += n
    return docs


def _ref_init():
    global _enc
    _enc = get_encoding()


def _ref_tokenize(doc):  # build-nanogpt's tokenize()
    tokens = [_enc._special_tokens["<|endoftext|>"]]
    tokens.extend(_enc.encode_ordinary(doc))
    tokens_np = np.array(tokens)
    assert (0 <= tokens_np).all() and (tokens_np < 2**16).all(), "token dictionary too large for uint16"
    return tokens_np.astype(np.uint16)


def reference(docs: list[str], workers: int, shard_size: int, out: str) -> int:
    """build-nanogpt's main loop: Pool.imap(chunksize=16), one collector, np.save per shard."""
    def write(index, arr):
        split = "val" if index == 0 else "train"
        np.save(os.path.join(out, f"edufineweb_{split}_{index:06d}"), arr)

    total = 0
    with mp.get_context("fork").Pool(workers, initializer=_ref_init) as pool:
        shard_index, all_tokens_np, token_count = 0, np.empty((shard_size,), dtype=np.uint16), 0
        for tokens in pool.imap(_ref_tokenize, docs, chunksize=16):
            total += len(tokens)
            if token_count + len(tokens) < shard_size:
                all_tokens_np[token_count:token_count + len(tokens)] = tokens
                token_count += len(tokens)
            else:
                remainder = shard_size - token_count
                all_tokens_np[token_count:token_count + remainder] = tokens[:remainder]
                write(shard_index, all_tokens_np)
                shard_index += 1
                all_tokens_np[0:len(tokens) - remainder] = tokens[remainder:]
                token_count = len(tokens) - remainder
        if token_count:
            write(shard_index, all_tokens_np[:token_count])
    return total


def single_thread(docs: list[str]) -> tuple[int, float]:
    enc = get_encoding()
    t = time.perf_counter()
    n = sum(len(enc.encode_ordinary(d)) + 1 for d in docs)
    return n, time.perf_counter() - t


def _slice_tokens(part: list[str]) -> int:
    enc = get_encoding()
    return sum(len(enc.encode_ordinary(d)) + 1 for d in part)


def ceiling(docs: list[str], workers: int) -> int:
    """K independent tokenizer processes over interleaved slices; no results travel but a count."""
    with mp.get_context("fork").Pool(workers) as pool:
        return sum(pool.map(_slice_tokens, [docs[i::workers] for i in range(workers)]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=float, default=10e6, help="corpus size in tokens (approximate)")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--shard-tokens", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=1, help="alternating runs; the best of each is reported")
    args = ap.parse_args(argv)

    docs = make_corpus(int(args.tokens))
    n, dt = single_thread(docs)
    single = n / dt
    print(f"corpus: {len(docs):,} documents, {n:,} tokens; cores used: {args.workers} (machine: {os.cpu_count()})")
    print(f"single-thread encode_ordinary: {single / 1e6:.2f} M tokens/s")
    best = {"ceiling": 0.0, "reference": 0.0, "ours": 0.0}
    for _ in range(args.repeats):
        t = time.perf_counter()
        total = ceiling(docs, args.workers)
        best["ceiling"] = max(best["ceiling"], total / (time.perf_counter() - t))
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            total = reference(docs, args.workers, args.shard_tokens, d)
            best["reference"] = max(best["reference"], total / (time.perf_counter() - t))
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            m = pipeline.build(d, TextsSource(docs), args.shard_tokens, args.workers, progress=False)
            best["ours"] = max(best["ours"], m["total_tokens"] / (time.perf_counter() - t))
        assert m["total_tokens"] == total == n
    for name, tps in best.items():
        print(f"{name:>9}: {tps / 1e6:6.2f} M tokens/s   parallel efficiency {tps / (args.workers * single):5.1%}")
    print(f"ratio ours/reference: {best['ours'] / best['reference']:.2f}x; ours reaches "
          f"{best['ours'] / best['ceiling']:.0%} of this machine's {args.workers}-process ceiling")
    return 0


if __name__ == "__main__":
    sys.exit(main())
