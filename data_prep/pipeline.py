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
from typing import Any

import numpy as np

from common import store
from common.errors import BadInput
from common.outputs import claim_folder
from common.shards import MANIFEST, PREFIX, parse_name, read_manifest, shard_name
from data_prep.shard_writer import Resume, ShardWriter
from data_prep.sources import DEFAULT_SHARD_TOKENS, Source
from data_prep.tokenize import tokenize_units

__all__ = ["DEFAULT_SHARD_TOKENS", "PrepError", "build", "claim_output", "tokens_done"]

STATE_DIR = ".prep"


class PrepError(BadInput):
    """The output store holds something this run must not overwrite or extend; the message says why."""


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
    source: Source,
    shard_tokens: int | None = None,
    workers: int = 1,
    prefix: str = PREFIX,
    progress: bool = True,
    max_shards: int | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Tokenize `source` (see data_prep.sources) into shards under `out_url`; returns the manifest.
    `shard_tokens` defaults to the source's own. `max_shards` stops after that many shards without a
    manifest (an interrupted run, for the tests of resume). `force` writes into a folder that holds someone
    else's files."""
    shard_tokens = source.default_shard_tokens if shard_tokens is None else shard_tokens
    if shard_tokens <= 0:
        raise PrepError(f"shard_tokens must be a positive number of tokens, got {shard_tokens}")
    store.preflight(out_url, write=True)  # no credentials / no bucket: fail before reading any data
    claim_output(out_url, force)
    store.remove_stale_temporaries(out_url)
    source = source.resolved()  # a hub dataset pinned to a commit: the manifest names it
    desc = source.describe()
    fp = fingerprint(desc, shard_tokens, prefix)
    if (manifest := complete_manifest(out_url, fp)) is not None:
        return manifest
    done = _finished(out_url, fp, prefix)
    start = done[-1]["end"] if done else (0, 0)
    writer = ShardWriter(
        out_url, shard_tokens, prefix, [s["shard"] for s in done], _sidecar(out_url, fp), max_shards
    )
    with _progress_bar(source, writer.records, progress) as bar:
        docs_end = _tokenize_into(writer, source, tuple(start), workers, bar)
    manifest = writer.finish(
        (docs_end, 0), source=desc, shard_tokens=shard_tokens, documents=docs_end, fingerprint=fp
    )
    return manifest if manifest is not None else {"shards": writer.records, "complete": False}


def _tokenize_into(
    writer: ShardWriter, source: Source, start: tuple[int, int], workers: int, bar
) -> int:
    """The source's documents from `start` (document, token offset: where the last finished shard ended)
    tokenized into `writer`; returns the index of the document after the last one read."""
    start_doc, skip = start
    docs_end = start_doc
    if writer.stopped:
        return docs_end
    for first, toks, lens in tokenize_units(source.units(start_doc), workers):
        cum = np.cumsum(lens, dtype=np.int64)

        def resume(at: int, first: int = first, cum: np.ndarray = cum) -> Resume:
            d = int(np.searchsorted(cum, at, side="right"))  # the document the next shard starts in
            return first + d, at - (int(cum[d - 1]) if d else 0)

        # the resumed document's first `skip` tokens are in a finished shard already
        writer.add(toks, skip if first == start_doc else 0, resume)
        bar.update(int(toks.size))
        bar.set_postfix(shards=writer.index)
        docs_end = first + len(lens)
        if writer.stopped:
            break
    return docs_end


def _sidecar(out_url: str, fp: str):
    """What each finished shard leaves for a resumed run: its manifest entry and where the next one starts."""
    state_url = store.join(out_url, STATE_DIR)

    def write(rec: dict[str, Any], resume: Resume) -> None:
        store.write_json(
            store.join(state_url, rec["name"] + ".json"),
            {"shard": rec, "end": list(resume), "fingerprint": fp},
        )

    return write


def _progress_bar(source: Source, records: list[dict[str, Any]], show: bool):
    from tqdm import tqdm

    bar = tqdm(
        total=source.approx_tokens(),
        initial=sum(r["tokens"] for r in records),
        unit="tok",
        unit_scale=True,
        desc="tokenizing",
        disable=not show,
        dynamic_ncols=True,
    )
    bar.set_postfix(shards=len(records))
    return bar
