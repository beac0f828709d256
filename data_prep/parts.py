"""Source files tokenized independently ("parts"), then laid out as shards: the map and reduce of a data-prep
job array (cluster/prep_array.py runs one `tokenize_part` per array task, then `assemble` once).

A part is the raw uint16 token stream of one source file ([<|endoftext|>] + encode_ordinary(text) per
document) at `{out}/.prep/parts/part_NNNNN.bin`, with a sidecar `.json` (tokens, documents, sha256) written
after it. Shards are consecutive slices of the concatenation of the parts in file order, so `assemble`
writes exactly the shards and the manifest that pipeline.build writes for the same files in one process.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from common import store
from common.shards import DTYPE, PREFIX
from data_prep.pipeline import PrepError, complete_manifest, fingerprint
from data_prep.shard_writer import ShardWriter
from data_prep.sources import DEFAULT_SHARD_TOKENS, FileSource
from data_prep.tokenize import tokenize_units

PARTS_DIR = ".prep/parts"
READ_TOKENS = 1 << 24  # 32 MB of tokens per read while assembling: memory stays bounded


def part_url(out_url: str, index: int) -> str:
    return store.join(out_url, PARTS_DIR, f"part_{index:05d}.bin")


def sidecar_url(out_url: str, index: int) -> str:
    return part_url(out_url, index)[: -len(".bin")] + ".json"


def part_done(out_url: str, index: int, file_url: str) -> dict[str, Any] | None:
    """The part's record when it is complete for this very file (name and size), else None."""
    url = sidecar_url(out_url, index)
    if not store.exists(url):
        return None
    rec = store.read_json(url)
    return rec if rec.get("file") == FileSource([file_url]).describe()["files"][0] else None


def parts_done(out_url: str, count: int) -> int:
    """How many of parts 0..count-1 are complete (their sidecars exist): cheap enough to poll for progress."""
    return sum(store.exists(sidecar_url(out_url, i)) for i in range(count))


def tokenize_part(out_url: str, file_url: str, index: int, workers: int = 1) -> dict[str, Any]:
    """Tokenize one source file into part `index`; a part already complete for this file is kept."""
    done = part_done(out_url, index, file_url)
    if done is not None:
        return done
    src = FileSource([file_url])
    digest, tokens, documents = hashlib.sha256(), 0, 0
    fs, path = store.fs_and_path(part_url(out_url, index))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:  # streamed: a part never sits whole in memory
        for _, toks, lens in tokenize_units(src.units(), workers):
            data = toks.tobytes()
            f.write(data)
            digest.update(data)
            tokens += int(toks.size)
            documents += int(lens.size)
    rec = {
        "file": src.describe()["files"][0],
        "tokens": tokens,
        "documents": documents,
        "sha256": digest.hexdigest(),
    }
    store.write_json(
        sidecar_url(out_url, index), rec
    )  # last: a sidecar never points at a partial part
    return rec


def _part_tokens(out_url: str, index: int):
    """The part's tokens in bounded chunks."""
    fs, path = store.fs_and_path(part_url(out_url, index))
    with fs.open(path, "rb") as f:
        while True:
            data = f.read(2 * READ_TOKENS)
            if not data:
                return
            yield np.frombuffer(data, dtype=DTYPE)


def assemble(
    out_url: str,
    file_urls: list[str],
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    prefix: str = PREFIX,
) -> dict[str, Any]:
    """Parts 0..n-1 -> shards + manifest.json (identical to pipeline.build over the same files)."""
    desc = FileSource(file_urls).describe()
    fp = fingerprint(desc, shard_tokens, prefix)
    if (manifest := complete_manifest(out_url, fp)) is not None:
        return manifest
    missing = [i for i, u in enumerate(file_urls) if part_done(out_url, i, u) is None]
    if missing:
        raise PrepError(
            f"parts {missing[:10]}{'...' if len(missing) > 10 else ''} of {len(file_urls)} are not "
            f"tokenized yet (or their source file changed)"
        )
    writer = ShardWriter(out_url, shard_tokens, prefix)
    documents = 0
    for i in range(len(file_urls)):
        documents += store.read_json(sidecar_url(out_url, i))["documents"]
        for toks in _part_tokens(out_url, i):
            writer.add(toks)
    manifest = writer.finish(
        (documents, 0), source=desc, shard_tokens=shard_tokens, documents=documents, fingerprint=fp
    )
    assert manifest is not None  # no max_shards: always complete
    return manifest
