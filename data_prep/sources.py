"""Document sources for data_prep: the FineWeb-Edu dataset on the Hugging Face hub, or parquet/jsonl files.

A source yields its documents in a fixed order as batches `(first_doc_index, texts)`; `texts` is a list of
str or a pyarrow string array (cheap to send to a worker process, which converts it). `units(start_doc)` is
the same stream for the tokenizer pool, where a parquet row group comes as a `ParquetRows` record instead
of its texts: the worker reads it, so the one coordinating process never reads, decodes or ships text, and
it does not saturate on a many-core machine. `batches(start_doc)`
skips the documents before `start_doc` without handing them to the tokenizer, which is how a resumed run
picks up where its last finished shard ended. A hub dataset stored as parquet (FineWeb-Edu) is read from
its resolved files like a FileSource, so that skip goes by footer row counts instead of streaming them.

SOURCE specs:
    hf:HuggingFaceFW/fineweb-edu:sample-10BT[@revision]   the hub dataset (also: a bare `sample-10BT`)
    path/or/url.parquet, file.jsonl[.gz], a folder of them, a glob; several, comma separated
    demo                                                   Python's standard-library docstrings (offline)
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import posixpath
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import fsspec

from common.errors import BadInput

HUB_DATASET = "HuggingFaceFW/fineweb-edu"
HUB_CONFIGS = ("sample-10BT", "sample-100BT", "sample-350BT")
DEFAULT_SOURCE = f"hf:{HUB_DATASET}:sample-10BT"
DEMO_SOURCE = "demo"
# Approximate GPT-2 token totals of the hub configs: only for the progress bar's ETA.
HUB_TOKENS = {
    "sample-10BT": 10_000_000_000,
    "sample-100BT": 100_000_000_000,
    "sample-350BT": 350_000_000_000,
}
# plain text files are one document each (a documentation tree, a folder of books)
TEXT_SUFFIXES = (".txt", ".md", ".rst")
FILE_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".json", ".json.gz", *TEXT_SUFFIXES)
BATCH_DOCS = (
    512  # documents per unit of tokenizer work: large enough to amortise IPC, small for memory
)
BATCH_CHARS = (
    1 << 20
)  # ... and at most about this much text, so long documents still spread over workers


class SourceError(BadInput):
    """The source cannot be read (missing, unreachable, empty, wrong schema); the message names it."""


DEFAULT_SHARD_TOKENS = 100_000_000  # build-nanogpt's shard_size


class Source(Protocol):
    """What data prep reads documents from (the module's docstring says how)."""

    default_shard_tokens: int  # the shard size when none is asked for

    def describe(self) -> dict[str, Any]:
        """What fixes the documents and their order (part of the output's fingerprint)."""

    def approx_tokens(self) -> int | None:
        """About how many tokens there are, for the progress bar (None: unknown)."""

    def batches(self, start_doc: int = 0) -> Iterator[tuple[int, Any]]:
        """(first document index, texts) from document `start_doc` on."""

    def units(self, start_doc: int = 0) -> Iterator[tuple[int, Any]]:
        """The same stream as units of the tokenizer pool's work (texts, or where to read them)."""

    def resolved(self) -> Source:
        """The same source pinned, so that a resumed run reads the same documents (a hub dataset: its
        commit); the source itself where there is nothing to pin."""


class _Reader:
    """`batches` hands out texts; `units` may hand out ParquetRows records instead (for the worker pool)."""

    default_shard_tokens = DEFAULT_SHARD_TOKENS

    def batches(self, start_doc: int = 0) -> Iterator[tuple[int, Any]]:
        return self._read(start_doc, lazy=False)

    def units(self, start_doc: int = 0) -> Iterator[tuple[int, Any]]:
        return self._read(start_doc, lazy=True)

    def resolved(self) -> Source:
        return self

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def approx_tokens(self) -> int | None:
        raise NotImplementedError

    def _read(self, start_doc: int, lazy: bool) -> Iterator[tuple[int, Any]]:
        raise NotImplementedError


@dataclass
class HubSource(_Reader):
    dataset: str
    config: str | None
    revision: str | None = None
    # `load_dataset` keyword arguments, e.g. {"data_files": [...]} for the "parquet" builder in tests
    load_kwargs: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "kind": "hf",
            "dataset": self.dataset,
            "config": self.config,
            "revision": self.revision or "main",
        }
        if self.load_kwargs:
            d["load_kwargs"] = {
                k: v if isinstance(v, (str, int, float, bool)) else repr(v)
                for k, v in self.load_kwargs.items()
            }
        return d

    def approx_tokens(self) -> int | None:
        return HUB_TOKENS.get(self.config or "")

    def resolved(self) -> HubSource:
        """Pinned to the commit its revision (default: main) points at now. The manifest then records that
        commit, and a resumed run reads the same documents even if the dataset was updated in between."""
        if self.load_kwargs or (self.revision and re.fullmatch(r"[0-9a-f]{40}", self.revision)):
            return self  # a local builder (tests) or already a commit
        try:
            from huggingface_hub import HfApi

            sha = HfApi().dataset_info(self.dataset, revision=self.revision).sha
        except Exception as err:  # offline, unknown dataset, no access: one clear message
            raise SourceError(
                f"cannot resolve dataset {self.dataset!r} at revision {self.revision or 'main'!r} "
                f"on the hub: {type(err).__name__}: {err}"
            ) from None
        return dataclasses.replace(self, revision=sha)

    def _builder(self):
        try:
            import datasets

            # what load_dataset(..., streaming=True) builds first: it resolves the config's data files
            return datasets.load_dataset_builder(
                self.dataset, name=self.config, revision=self.revision, **self.load_kwargs
            )
        except (
            Exception
        ) as err:  # hub/network/auth errors come in many types; the message is what matters
            raise SourceError(
                f"cannot open dataset {self.dataset!r} (config {self.config!r}): "
                f"{type(err).__name__}: {err}"
            ) from None

    def _parquet_urls(self, builder) -> list[str] | None:
        """The train split's files in the order the streaming parquet builder reads them, or None where
        FileSource would not yield exactly the same documents (then the dataset is streamed)."""
        from datasets.packaged_modules.parquet.parquet import Parquet

        if not isinstance(builder, Parquet) or set(self.load_kwargs) - {"data_files", "data_dir"}:
            return None  # another format, or options (columns, filters, features, token...) FileSource ignores
        cfg = builder.config
        if cfg.filters is not None or cfg.columns is not None or cfg.on_bad_files != "error":
            return None
        # Streaming reads data_files["train"] file after file, each file's row groups in order
        # (Parquet._split_generators / _generate_tables; ArrowExamplesIterable keeps the shard order).
        urls = [str(u) for u in (cfg.data_files or {}).get("train") or []]
        if not urls or not all(u.endswith(".parquet") for u in urls):
            return None  # nothing resolved, or compressed/chained files ("zip://...::x.zip")
        pinned = (
            self.revision
            if self.revision and re.fullmatch(r"[0-9a-f]{40}", self.revision)
            else None
        )
        if pinned and any(u.startswith("hf://") and f"@{pinned}/" not in u for u in urls):
            return None  # not the pinned commit (not expected: datasets puts the commit in its hf:// URLs)
        return urls

    def _read(self, start_doc: int, lazy: bool) -> Iterator[tuple[int, Any]]:
        builder = self._builder()
        urls = self._parquet_urls(builder)
        try:
            if urls is not None:
                # The same documents in the same order, but a resume skips whole files and row groups by
                # their footer row counts instead of downloading and parsing every skipped document.
                files = FileSource(urls)
                yield from files.units(start_doc) if lazy else files.batches(start_doc)
            else:
                yield from self._streamed(builder, start_doc)
        except SourceError:
            raise
        except Exception as err:
            raise SourceError(
                f"reading dataset {self.dataset!r}: {type(err).__name__}: {err}"
            ) from None

    def _streamed(self, builder, start_doc: int) -> Iterator[tuple[int, list[str]]]:
        try:
            # what load_dataset(..., split="train", streaming=True) returns for this builder
            ds = builder.as_streaming_dataset(split="train")
        except Exception as err:
            raise SourceError(
                f"cannot open dataset {self.dataset!r} (config {self.config!r}): "
                f"{type(err).__name__}: {err}"
            ) from None
        if start_doc:
            ds = ds.skip(start_doc)  # still streamed past, but not tokenized
        index, texts, chars = start_doc, [], 0
        try:
            for ex in ds:
                texts.append(ex["text"])
                chars += len(texts[-1])
                if len(texts) == BATCH_DOCS or chars >= BATCH_CHARS:
                    yield index, texts
                    index, texts, chars = index + len(texts), [], 0
        except KeyError:
            raise SourceError(f"dataset {self.dataset!r} has no 'text' column") from None
        if texts:
            yield index, texts


@dataclass
class FileSource(_Reader):
    urls: list[str]  # fully qualified (protocol included), in reading order

    def describe(self) -> dict[str, Any]:
        fs_sizes = []
        for u in self.urls:
            fs, path = fsspec.core.url_to_fs(u)
            fs_sizes.append({"name": posixpath.basename(path), "bytes": int(fs.size(path))})
        return {"kind": "files", "files": fs_sizes}

    def approx_tokens(self) -> int | None:
        return None

    def _read(self, start_doc: int, lazy: bool) -> Iterator[tuple[int, Any]]:
        index = 0
        for url in self.urls:
            if url.endswith(".parquet"):
                # Row counts are in the parquet footer: a resumed run skips whole files and row groups
                # without downloading their data (what matters for hf:// or s3:// sources).
                yield from _parquet_batches(url, index, start_doc, lazy)
                index += _parquet_rows(url)
                continue
            if url.endswith(TEXT_SUFFIXES):
                if index >= start_doc:
                    yield index, [_text_file(url)]
                index += 1
                continue
            for texts in _jsonl_batches(url):
                n = len(texts)
                if (
                    index + n <= start_doc
                ):  # wholly before the resume point: skipped without tokenizing
                    index += n
                    continue
                if index < start_doc:
                    texts = texts[start_doc - index :]
                    index = start_doc
                yield index, texts
                index += len(texts)


# A row group up to this size is one unit of tokenizer work, read by its worker (FineWeb-Edu's files are
# written 1,000 documents per row group). A larger one is read here and sent as batches, so a worker never
# holds an unbounded row group and no row group is read twice.
LAZY_ROW_GROUP_DOCS = 16 * BATCH_DOCS


@dataclass(frozen=True)
class ParquetRows:
    """Documents [offset, offset + count) of one row group of a parquet file: a few bytes to send to a
    tokenizer worker, which reads the texts itself (`read`)."""

    url: str
    row_group: int
    offset: int
    count: int

    def __len__(self) -> int:
        return self.count

    def read(self):
        pf = _open_parquet_cached(self.url)
        try:
            texts = pf.read_row_group(self.row_group, columns=["text"]).column(0)
        except Exception as err:  # corrupt pages, a dropped connection: say which file and where
            raise SourceError(
                f"{self.url}: reading row group {self.row_group}: {type(err).__name__}: "
                f"{' '.join(str(err).split())}"
            ) from None
        if len(texts) != self.offset + self.count:
            raise SourceError(
                f"{self.url}: row group {self.row_group} has {len(texts)} rows, the footer said "
                f"{self.offset + self.count}"
            )
        return texts.slice(self.offset, self.count)


_open_files: dict[tuple[int, str], Any] = {}


def _open_parquet_cached(url: str):
    """The worker's open ParquetFile for `url`: consecutive row groups of one file cost one open (a footer
    read and, on S3 or the hub, a connection), not one per row group. Keyed by pid: never used across fork."""
    key = (os.getpid(), url)
    if key not in _open_files:
        for old in list(_open_files):
            _open_files.pop(old)[0].close()  # one file at a time per worker
        fs, path = fsspec.core.url_to_fs(url)
        f = fs.open(path, "rb")
        _open_files[key] = (f, _parquet_file(f, url))
    return _open_files[key][1]


def _parquet_file(f, url: str):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except Exception as err:
        raise SourceError(f"{url}: not a readable parquet file ({err})") from None
    if "text" not in pf.schema_arrow.names:
        raise SourceError(f"{url}: no 'text' column (columns: {pf.schema_arrow.names})")
    return pf


def _parquet_rows(url: str) -> int:
    fs, path = fsspec.core.url_to_fs(url)
    with fs.open(path, "rb") as f:
        return _parquet_file(f, url).metadata.num_rows


def _parquet_batches(
    url: str, first: int = 0, start_doc: int = 0, lazy: bool = False
) -> Iterator[tuple[int, Any]]:
    """(index, texts) of the file's documents from `start_doc` on; the file's first document has index `first`.
    With `lazy`, a row group of at most LAZY_ROW_GROUP_DOCS documents comes as a ParquetRows record."""
    fs, path = fsspec.core.url_to_fs(url)
    with fs.open(path, "rb") as f:
        pf = _parquet_file(f, url)
        index = first
        for rg in range(pf.metadata.num_row_groups):
            rows = pf.metadata.row_group(rg).num_rows
            if index + rows <= start_doc:
                index += rows  # wholly before the resume point: not even read
                continue
            if lazy and rows <= LAZY_ROW_GROUP_DOCS:
                offset = max(start_doc - index, 0)
                yield index + offset, ParquetRows(url, rg, offset, rows - offset)
                index += rows
                continue
            for batch in pf.iter_batches(batch_size=BATCH_DOCS, row_groups=[rg], columns=["text"]):
                texts = batch.column(0)
                if index + len(texts) <= start_doc:
                    index += len(texts)
                    continue
                if index < start_doc:
                    texts = texts.slice(start_doc - index)
                    index = start_doc
                yield index, texts
                index += len(texts)


def _text_file(url: str) -> str:
    fs, path = fsspec.core.url_to_fs(url)
    with fs.open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SourceError(f"{url}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _jsonl_batches(url: str) -> Iterator[list[str]]:
    fs, path = fsspec.core.url_to_fs(url)
    with fs.open(path, "rb") as raw:
        f = gzip.open(raw) if path.endswith(".gz") else raw
        texts, chars = [], 0
        for lineno, raw_line in enumerate(
            f, 1
        ):  # bytes: a line that is not UTF-8 is named, not a traceback
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise SourceError(
                    f"{url} line {lineno}: not UTF-8 text ({err.reason} at byte {err.start})"
                ) from None
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (ValueError, KeyError, TypeError):
                raise SourceError(
                    f"{url} line {lineno}: not a JSON object with a 'text' field"
                ) from None
            chars += len(texts[-1])
            if len(texts) == BATCH_DOCS or chars >= BATCH_CHARS:
                yield texts
                texts, chars = [], 0
        if texts:
            yield texts


def _expand(spec: str) -> list[str]:
    """Files named by one path/URL: the file itself, a folder's data files (sorted), or a glob's matches."""
    try:
        fs, path = fsspec.core.url_to_fs(spec)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        qualify = (
            (lambda p: p) if protocol in ("file", "local") else (lambda p: f"{protocol}://{p}")
        )
        if any(c in path for c in "*?["):
            found = sorted(fs.glob(path))
        elif fs.isdir(path):
            found = sorted(p for p in fs.find(path) if p.endswith(FILE_SUFFIXES))
            if not found:
                raise SourceError(
                    f"{spec}: folder has no {'/'.join(FILE_SUFFIXES)} files (empty dataset)"
                )
        elif fs.exists(path):
            found = [path]
        else:
            raise SourceError(f"{spec}: no such file or folder")
    except SourceError:
        raise
    except Exception as err:
        raise SourceError(f"cannot reach source {spec}: {type(err).__name__}: {err}") from None
    bad = [p for p in found if not p.endswith(FILE_SUFFIXES)]
    if bad:
        raise SourceError(
            f"{spec}: unsupported file type {bad[0]} (expected {', '.join(FILE_SUFFIXES)})"
        )
    if not found:
        raise SourceError(f"{spec}: matches no files (empty dataset)")
    return [qualify(p) for p in found]


def open_source(spec: str | None) -> HubSource | FileSource | TextsSource:
    spec = spec or DEFAULT_SOURCE
    if spec == DEMO_SOURCE:
        return DemoSource()
    if spec in HUB_CONFIGS:
        spec = f"hf:{HUB_DATASET}:{spec}"
    if spec.startswith("hf:"):
        body, _, revision = spec[3:].partition("@")
        parts = body.split(":")
        if len(parts) > 2 or not parts[0]:
            raise SourceError(f"bad hub spec {spec!r}: expected hf:OWNER/NAME[:CONFIG][@REVISION]")
        return HubSource(parts[0], parts[1] if len(parts) == 2 else None, revision or None)
    urls: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if part:
            urls.extend(_expand(part))
    return FileSource(urls)


@dataclass
class TextsSource:
    """Documents already in memory: the demo corpus (data_prep/demo_corpus.py), benchmarks and tests."""

    texts: list[str]
    name: str = "in-memory"
    default_shard_tokens = DEFAULT_SHARD_TOKENS

    def resolved(self) -> Source:
        return self

    def describe(self) -> dict[str, Any]:
        return {"kind": self.name, "documents": len(self.texts)}

    def approx_tokens(self) -> int | None:
        return None

    def units(self, start_doc: int = 0) -> Iterator[tuple[int, list[str]]]:
        return self.batches(start_doc)

    def batches(self, start_doc: int = 0) -> Iterator[tuple[int, list[str]]]:
        i = start_doc
        while i < len(self.texts):
            j, chars = i, 0
            while j < len(self.texts) and j - i < BATCH_DOCS and chars < BATCH_CHARS:
                chars += len(self.texts[j])
                j += 1
            yield i, self.texts[i:j]
            i = j


class DemoSource(TextsSource):
    """Python's standard-library docstrings (data_prep/demo_corpus.py), spec `demo`, in a seeded shuffled order
    so that the val shard (its first 100k tokens) is a sample of the whole library, not its first modules. Its
    natural shard size is small, so that even this corpus has a val shard and several train shards."""

    default_shard_tokens = 100_000

    def __init__(self, max_docs: int | None = None):
        import random

        from data_prep.demo_corpus import stdlib_documents

        docs = list(stdlib_documents(max_docs))
        random.Random(0).shuffle(docs)
        super().__init__(docs, name="python-stdlib-docstrings")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "python": sys.version.split()[0], "order": "shuffled, seed 0"}
