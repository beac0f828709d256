"""Tokenization throughput of data_prep against build-nanogpt's fineweb.py approach, same corpus, same cores.

    python bench/tokenize_throughput.py                       # ~10M tokens, all cores (small: a smoke run)
    python bench/tokenize_throughput.py --tokens 200e6 --repeats 3   # a real measurement

Corpus: generated dictionary-word documents (seeded), read from a Python list, then (`--source both`, the
default) from parquet files of 1,000-document row groups as FineWeb-Edu is stored. Both pipelines write
shards to a temporary folder:
  reference  multiprocessing.Pool(K).imap(tokenize, docs, chunksize=16), encode_ordinary per document,
             one collecting process that also iterates the dataset, filling the shard buffer (build-nanogpt's
             loop over its `load_dataset` rows);
  ours       data_prep.pipeline.build with K workers, including what it adds (resume sidecars, sha256s,
             manifest).
  ceiling    K processes tokenizing the corpus with no coordination beyond taking the next 64 documents'
             indices (no texts or tokens travel, no collector, no writes), with the call ours uses: the
             most K cores of this machine give, since cores slow each other down through shared caches,
             memory bandwidth and the hypervisor.
Prints tokens/s of each, the ratio, and parallel efficiency = tokens/s / (K x single-thread tokens/s) against
two single-thread figures: `encode_ordinary` (the usual definition, the call build-nanogpt makes) and
`encode_to_numpy` (the same tokens without building a list of Python ints, ~15% faster, the call ours
makes: against it, what is lost is parallel overhead only). Ours is also given as a fraction of the ceiling.
For both pipelines it also prints the CPU time their one coordinating process spends per token (reading,
sending, collecting, hashing, writing; the marginal cost, from a full and a tenth-size run, so start-up costs
such as loading the BPE or forking do not count): the rate at which that process alone would saturate, i.e.
how many cores' worth of tokenizing it can keep up with on a larger machine.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.tokenizer import get_encoding
from data_prep import pipeline
from data_prep.sources import TextsSource, open_source
from data_prep.tokenize import encode_ordinary_array

_enc = None


def make_corpus(n_tokens: int, seed: int = 0) -> list[str]:
    """Documents of 50..2000 words drawn from a fixed pseudo-dictionary (~3 GPT-2 tokens per word)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, rng.integers(2, 9))) for _ in range(20_000)]
    vocab += (
        "the of and to in is was for that on as with by at from it this which are".split() * 200
    )
    docs, words = [], 0
    while words * 3 < n_tokens:
        n = int(rng.integers(50, 2000))
        idx = rng.integers(0, len(vocab), n)
        docs.append(" ".join(vocab[i] for i in idx) + ".")
        words += n
    return docs


def write_parquet_corpus(
    docs: list[str], folder: str, files: int = 4, row_group: int = 1000
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    per_file = -(-len(docs) // files)
    for i in range(files):
        part = docs[i * per_file : (i + 1) * per_file]
        if part:
            pq.write_table(
                pa.table({"text": part}),
                os.path.join(folder, f"{i:03d}_00000.parquet"),
                row_group_size=row_group,
            )


def parquet_texts(folder: str):
    """The documents as build-nanogpt's main process meets them: rows of an on-disk dataset, read in order."""
    import pyarrow.parquet as pq

    for name in sorted(os.listdir(folder)):
        for batch in pq.ParquetFile(os.path.join(folder, name)).iter_batches(
            batch_size=1000, columns=["text"]
        ):
            yield from batch.column(0).to_pylist()


def _ref_init():
    global _enc
    _enc = get_encoding()


def _ref_tokenize(doc):  # build-nanogpt's tokenize()
    tokens = [_enc._special_tokens["<|endoftext|>"]]
    tokens.extend(_enc.encode_ordinary(doc))
    tokens_np = np.array(tokens)
    assert (0 <= tokens_np).all() and (tokens_np < 2**16).all(), (
        "token dictionary too large for uint16"
    )
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
                all_tokens_np[token_count : token_count + len(tokens)] = tokens
                token_count += len(tokens)
            else:
                remainder = shard_size - token_count
                all_tokens_np[token_count : token_count + remainder] = tokens[:remainder]
                write(shard_index, all_tokens_np)
                shard_index += 1
                all_tokens_np[0 : len(tokens) - remainder] = tokens[remainder:]
                token_count = len(tokens) - remainder
        if token_count:
            write(shard_index, all_tokens_np[:token_count])
    return total


def _count(enc, text: str) -> int:
    """Tokens of one document with the call data_prep makes (the same tokens as encode_ordinary)."""
    if not hasattr(enc, "encode_to_numpy"):  # tiktoken < 0.8
        return len(enc.encode_ordinary(text)) + 1
    return encode_ordinary_array(enc, text).size + 1


def single_thread(docs: list[str]) -> dict[str, float]:
    """Single-thread tokens/s of both calls on `docs`."""
    enc, rates = get_encoding(), {}
    for name, count in (
        ("encode_ordinary", lambda d: len(enc.encode_ordinary(d)) + 1),
        ("encode_to_numpy", lambda d: _count(enc, d)),
    ):
        t = time.perf_counter()
        n = sum(count(d) for d in docs)
        rates[name] = n / (time.perf_counter() - t)
    return rates


_CORPUS: list[str] = []  # set before the ceiling's fork: the workers read it from the copied memory


def _range_tokens(start: int, stop: int) -> int:
    enc = get_encoding()
    return sum(_count(enc, d) for d in _CORPUS[start:stop])


def ceiling(docs: list[str], workers: int, step: int = 64) -> int:
    """K tokenizer processes over ranges of `step` documents taken as each finishes; nothing travels but two
    indices and a count (the documents reach the workers through fork's copy of this process's memory).
    Ranges rather than K fixed slices: on a VM a vCPU stalled by a neighbour would otherwise hold the whole
    figure back, and the pipelines measured here balance their load too."""
    global _CORPUS
    _CORPUS = docs
    try:
        with mp.get_context("fork").Pool(workers, initializer=get_encoding) as pool:
            ranges = [(i, min(i + step, len(docs))) for i in range(0, len(docs), step)]
            return sum(pool.starmap(_range_tokens, ranges, chunksize=1))
    finally:
        _CORPUS = []


def _own_cpu() -> float:
    """CPU seconds of this process, all its threads (not the worker processes)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--tokens", type=float, default=10e6, help="corpus size in tokens (approximate)"
    )
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--shard-tokens", type=int, default=1_000_000)
    ap.add_argument(
        "--repeats", type=int, default=1, help="alternating runs; the best of each is reported"
    )
    ap.add_argument(
        "--source",
        choices=("memory", "parquet", "both"),
        default="both",
        help="where the documents come from (both: one block each)",
    )
    args = ap.parse_args(argv)

    docs = make_corpus(int(args.tokens))
    n = sum(
        len(d) for d in get_encoding().encode_ordinary_batch(docs, num_threads=args.workers)
    ) + len(docs)
    print(
        f"corpus: {len(docs):,} documents, {n:,} tokens; cores used: {args.workers} (machine: {os.cpu_count()})"
    )
    for source in ("memory", "parquet") if args.source == "both" else (args.source,):
        measure(docs, n, source, args)
    return 0


def measure(docs: list[str], n: int, source: str, args) -> None:
    print(
        f"\n[documents from {'a Python list' if source == 'memory' else 'parquet files, 1,000-doc row groups'}]"
    )
    best = {"ceiling": 0.0, "reference": 0.0, "ours": 0.0}
    single = {"encode_ordinary": 0.0, "encode_to_numpy": 0.0}
    # The full corpus and its first tenth (the coordinator's marginal CPU cost is their difference), written
    # as parquet before any timing starts.
    corpora = {"full": docs, "tenth": docs[: len(docs) // 10]}
    src_dir = tempfile.TemporaryDirectory()
    if source == "parquet":
        for key, texts in corpora.items():
            os.makedirs(os.path.join(src_dir.name, key))
            write_parquet_corpus(texts, os.path.join(src_dir.name, key))

    def run_reference(key: str, out: str) -> int:
        texts = (
            corpora[key] if source == "memory" else parquet_texts(os.path.join(src_dir.name, key))
        )
        return reference(texts, args.workers, args.shard_tokens, out)

    def run_ours(key: str, out: str) -> int:
        src = (
            TextsSource(corpora[key])
            if source == "memory"
            else open_source(os.path.join(src_dir.name, key))
        )
        return pipeline.build(out, src, args.shard_tokens, args.workers, progress=False)[
            "total_tokens"
        ]

    runs = {"reference": run_reference, "ours": run_ours}
    cpu = {name: {} for name in runs}  # corpus size -> (tokens, coordinator CPU seconds), best run
    for _ in range(args.repeats):
        # the denominator of the efficiencies is measured like the rest, best of the repeats, between them:
        # one figure taken once would put a moment of this machine's noise into every percentage
        for call, rate in single_thread(corpora["tenth"]).items():
            single[call] = max(single[call], rate)
        t = time.perf_counter()
        total = ceiling(docs, args.workers)
        best["ceiling"] = max(best["ceiling"], total / (time.perf_counter() - t))
        for name, run in runs.items():
            for key in corpora:
                with tempfile.TemporaryDirectory() as d:
                    t, c = time.perf_counter(), _own_cpu()
                    tokens = run(key, d)
                    dt, dc = time.perf_counter() - t, _own_cpu() - c
                if key == "full":
                    best[name] = max(best[name], tokens / dt)
                    assert tokens == n
                prev = cpu[name].get(key, (tokens, float("inf")))
                cpu[name][key] = (tokens, min(prev[1], dc))
    src_dir.cleanup()
    _report(best, single, cpu, args.workers)


def _report(best: dict, single: dict, cpu: dict, workers: int) -> None:
    """The throughputs against one thread's, the ratio to the reference, and where each coordinator saturates."""
    print(
        f"single thread: encode_ordinary {single['encode_ordinary'] / 1e6:.2f} M tokens/s, encode_to_numpy "
        f"{single['encode_to_numpy'] / 1e6:.2f} M tokens/s (first tenth of the corpus)"
    )
    for name, tps in best.items():
        eff = [tps / (workers * single[call]) for call in ("encode_ordinary", "encode_to_numpy")]
        print(
            f"{name:>9}: {tps / 1e6:6.2f} M tokens/s   parallel efficiency {eff[0]:5.1%} of encode_ordinary, "
            f"{eff[1]:5.1%} of encode_to_numpy"
        )
    print(
        f"ratio ours/reference: {best['ours'] / best['reference']:.2f}x; ours reaches "
        f"{best['ours'] / best['ceiling']:.0%} of this machine's {workers}-process ceiling"
    )
    for name, sizes in cpu.items():
        (n_small, c_small), (n_full, c_full) = sorted(sizes.values())
        per_token = max(c_full - c_small, 1e-9) / (n_full - n_small)
        limit = 1 / per_token
        print(
            f"coordinator {name:>9}: {per_token * 1e9:6.1f} CPU-ns per token: saturates at ~{limit / 1e6:.0f} M "
            f"tokens/s, the tokenizing of ~{limit / single['encode_to_numpy']:.0f} cores"
        )


if __name__ == "__main__":
    sys.exit(main())
