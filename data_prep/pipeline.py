"""Documents -> token shards in build-nanogpt's layout, resumable after a crash at any point.

The concatenated token stream ([<|endoftext|>] + encode_ordinary(text) per document) is cut into consecutive
slices of `shard_tokens`; slice 0 is `*_val_000000.npy`, the others `*_train_NNNNNN.npy`, the last one
holds the remainder. That is exactly what build-nanogpt's fineweb.py writes for the same documents.

Resume: after each shard is stored, a small sidecar `.prep/<shard>.json` records its manifest entry and the
stream position where the next shard starts (document index, token offset in that document). A rerun keeps
the longest run of shards that have sidecars, skips the documents before that position without tokenizing
them, and rewrites everything after it, so the result is byte-identical to an uninterrupted run. The
manifest is written last: its presence means the store is complete.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from common import store
from common.errors import BadInput
from common.outputs import claim_folder
from common.shards import (
    MANIFEST,
    PREFIX,
    parse_name,
    read_manifest,
    shard_name,
    write_manifest,
    write_shard,
)
from common.tokenizer import EOT_TOKEN
from data_prep.packer import ShardPacker
from data_prep.tokenize import tokenize_units

STATE_DIR = ".prep"
DEFAULT_SHARD_TOKENS = 100_000_000  # build-nanogpt's shard_size


class PrepError(BadInput):
    """The output store holds something this run must not overwrite or extend; the message says why."""


def default_shard_tokens(source) -> int:
    """build-nanogpt's 100M tokens, or a small source's own size (the demo corpus: 100k)."""
    return getattr(source, "default_shard_tokens", DEFAULT_SHARD_TOKENS)


def fingerprint(source: dict[str, Any], shard_tokens: int, prefix: str) -> str:
    """What fixes the output bytes; a resumed run must match it."""
    key = json.dumps(
        {"source": source, "shard_tokens": shard_tokens, "prefix": prefix, "tokenizer": "gpt2"},
        sort_keys=True,
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def claim_output(out_url: str, force: bool = False) -> None:
    """Shards are written only into an empty folder or one this tool started (its .prep state or manifest):
    never over shards someone else wrote, which would leave theirs and ours mixed."""
    started = bool({STATE_DIR, MANIFEST} & set(store.listdir(out_url)))
    claim_folder(
        out_url,
        ours=lambda n: n in (STATE_DIR, MANIFEST) or (started and parse_name(n) is not None),
        what="data prep",
        force=force,
    )


def complete_manifest(out_url: str, fp: str) -> dict[str, Any] | None:
    """The manifest of a store that is complete for fingerprint `fp`, None when it is not complete yet; a
    store completed from another source or shard size is a PrepError (it is never overwritten)."""
    manifest = read_manifest(out_url)
    if manifest is not None and manifest.get("fingerprint") != fp:
        raise PrepError(
            f"{out_url} is already complete for another source or shard size; write to an empty --out"
        )
    return manifest


def tokens_done(out_url: str) -> int:
    """Tokens in the shards finished so far (from their resume sidecars): cheap enough to poll for progress."""
    fs, path = store.fs_and_path(store.join(out_url, STATE_DIR))
    try:
        names = fs.glob(path.rstrip("/") + "/*.json")
    except (FileNotFoundError, OSError):
        return 0
    total = 0
    for name in names:
        try:
            total += json.loads(fs.cat_file(name))["shard"]["tokens"]
        except (OSError, ValueError, KeyError):
            pass  # a sidecar being written right now
    return total


def _finished(out_url: str, fp: str, prefix: str) -> list[dict[str, Any]]:
    """Sidecar states of the shards 0..k-1 that are complete for this fingerprint."""
    state_url = store.join(out_url, STATE_DIR)
    have_shards = set(store.listdir(out_url))
    have_states = set(store.listdir(state_url))
    done: list[dict[str, Any]] = []
    while True:
        name = shard_name(len(done), prefix)
        if name not in have_shards or f"{name}.json" not in have_states:
            return done
        state = store.read_json(store.join(state_url, f"{name}.json"))
        if state.get("fingerprint") != fp:
            raise PrepError(
                f"{out_url} holds shards from another source or shard size (fingerprint "
                f"{state.get('fingerprint')} != {fp}; a hub dataset updated since the first run "
                f"does this too: pin its revision with @COMMIT); write to an empty --out"
            )
        done.append(state)


def build(
    out_url: str,
    source,
    shard_tokens: int | None = None,
    workers: int = 1,
    prefix: str = PREFIX,
    progress: bool = True,
    max_shards: int | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Tokenize `source` (see data_prep.sources) into shards under `out_url`; returns the manifest.
    `shard_tokens` defaults to `default_shard_tokens(source)`. `max_shards` stops after that many shards
    without a manifest (an interrupted run, for the tests of resume). `force` writes into a folder that
    holds someone else's files."""
    shard_tokens = default_shard_tokens(source) if shard_tokens is None else shard_tokens
    if shard_tokens <= 0:
        raise PrepError(f"shard_tokens must be a positive number of tokens, got {shard_tokens}")
    store.preflight(out_url, write=True)  # no credentials / no bucket: fail before reading any data
    claim_output(out_url, force)
    store.remove_stale_temporaries(out_url)
    if hasattr(source, "resolved"):
        source = source.resolved()  # a hub dataset pinned to a commit: the manifest names it
    desc = source.describe()
    fp = fingerprint(desc, shard_tokens, prefix)
    if (manifest := complete_manifest(out_url, fp)) is not None:
        return manifest

    done = _finished(out_url, fp, prefix)
    records = [s["shard"] for s in done]
    start_doc, skip = done[-1]["end"] if done else (0, 0)
    state_url = store.join(out_url, STATE_DIR)

    def store_shard(index: int, tokens: np.ndarray, end: tuple[int, int]) -> dict[str, Any]:
        rec = write_shard(out_url, index, tokens, prefix)
        # the sidecar goes after the shard: a sidecar never points at a missing or partial shard
        store.write_json(
            store.join(state_url, rec["name"] + ".json"),
            {"shard": rec, "end": list(end), "fingerprint": fp},
        )
        return rec

    from tqdm import tqdm

    bar = tqdm(
        total=source.approx_tokens(),
        initial=sum(r["tokens"] for r in records),
        unit="tok",
        unit_scale=True,
        desc="tokenizing",
        disable=not progress,
        dynamic_ncols=True,
    )
    bar.set_postfix(shards=len(records))
    index, docs_end = len(records), start_doc
    packer = ShardPacker(shard_tokens)
    writes: list[Future] = []
    stop = False
    # one writer thread: uploads and hashing overlap tokenization; at most two shard buffers wait on it
    with bar, ThreadPoolExecutor(1) as writer:

        def submit(tokens: np.ndarray, end: tuple[int, int]) -> None:
            nonlocal index
            while len(writes) >= 2:
                records.append(writes.pop(0).result())
            writes.append(writer.submit(store_shard, index, tokens, end))
            index += 1
            bar.set_postfix(shards=index)

        if max_shards is None or index < max_shards:
            for first, toks, lens in tokenize_units(source.units(start_doc), workers):
                cum = np.cumsum(lens, dtype=np.int64)
                pos = (
                    skip if first == start_doc else 0
                )  # the resumed document's tokens already in a shard
                skip = 0
                for shard, at in packer.add(toks, pos):
                    d = int(
                        np.searchsorted(cum, at, side="right")
                    )  # where the next shard starts: doc, offset
                    submit(shard, (first + d, at - (int(cum[d - 1]) if d else 0)))
                    if max_shards is not None and index >= max_shards:
                        stop = True
                        break
                bar.update(int(toks.size))
                docs_end = first + len(lens)
                if stop:
                    break
            rest = packer.rest()
            if rest is not None and not stop:
                submit(rest, (docs_end, 0))  # build-nanogpt writes the remainder too
        for f in writes:
            records.append(f.result())
    if stop:
        return {"shards": records, "complete": False}
    if not records:
        raise PrepError(f"the source has no documents (empty dataset): {desc}")
    write_manifest(
        out_url,
        records,
        source=desc,
        shard_tokens=shard_tokens,
        documents=docs_end,
        eot_token=EOT_TOKEN,
        fingerprint=fp,
    )
    return read_manifest(out_url)
