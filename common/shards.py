"""The token-shard format: what data_prep writes, the training loader reads and the verifier checks.

build-nanogpt's layout, byte for byte: a shard is `np.save` of a 1-D uint16 array of GPT-2 token ids, named
`{prefix}_{split}_{index:06d}.npy`; index 0 is the val shard, 1.. are train shards. `manifest.json`, written
after every shard, lists them in order with token counts and sha256s (plus how they were made); readers trust
the manifest, not the folder listing, and check every shard against it. A folder without a manifest (e.g. one
written by build-nanogpt's fineweb.py) is read from its listing.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from common import store
from common.errors import BadInput
from common.tokenizer import VOCAB_SIZE

PREFIX = "edufineweb"
DTYPE = np.uint16
SPLITS = ("train", "val")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "gpt2-repro-shards/1"
_NAME = re.compile(r"^(?P<prefix>.+)_(?P<split>train|val)_(?P<index>\d+)\.npy$")


class ShardError(BadInput, ValueError):
    """A shard (or the shard set) that cannot be trained on; the message names it."""


def split_of(index: int) -> str:
    return "val" if index == 0 else "train"


def shard_name(index: int, prefix: str = PREFIX) -> str:
    return f"{prefix}_{split_of(index)}_{index:06d}.npy"


def parse_name(name: str) -> tuple[str, int] | None:
    """(split, index) of a shard file name, None for any other file."""
    m = _NAME.match(name)
    return (m.group("split"), int(m.group("index"))) if m else None


# ----------------------------------------------------------------------------- bytes


def shard_bytes(tokens: np.ndarray) -> bytes:
    if tokens.dtype != DTYPE or tokens.ndim != 1:
        raise ValueError(
            f"shards hold 1-D {np.dtype(DTYPE)} tokens, got {tokens.dtype} {tokens.shape}"
        )
    buf = io.BytesIO()
    np.save(buf, tokens)  # what build-nanogpt's write_datafile does (np.save to an open file)
    return buf.getvalue()


def decode(data: bytes, name: str) -> np.ndarray:
    """A shard's tokens; an unreadable file or another dtype or shape is a ShardError naming it."""
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, EOFError, OSError) as err:
        raise ShardError(f"shard {name} is not a readable .npy file (truncated?): {err}") from None
    if arr.dtype != DTYPE or arr.ndim != 1:
        raise ShardError(
            f"shard {name} holds {arr.dtype} with shape {arr.shape}; expected 1-D uint16 tokens"
        )
    return arr


def max_token_outside_vocab(tokens: np.ndarray) -> int | None:
    """The largest id that is not a GPT-2 token (>= VOCAB_SIZE), or None when every id is one."""
    top = int(tokens.max()) if tokens.size else 0
    return top if top >= VOCAB_SIZE else None


# ----------------------------------------------------------------------------- writing


def write_shard(
    data_url: str, index: int, tokens: np.ndarray, prefix: str = PREFIX
) -> dict[str, Any]:
    """Write shard `index`; returns its manifest entry."""
    name = shard_name(index, prefix)
    data = shard_bytes(tokens)
    store.write_bytes(store.join(data_url, name), data)
    return {"name": name, "tokens": int(tokens.size), "sha256": store.sha256(data)}


def write_manifest(data_url: str, shards: Iterable[dict[str, Any]], **meta: Any) -> None:
    """The manifest, written last: its presence means every shard it lists is complete."""
    shards = list(shards)
    store.write_json(
        store.join(data_url, MANIFEST),
        {
            "format": MANIFEST_FORMAT,
            "tokenizer": "gpt2",
            "dtype": np.dtype(DTYPE).name,
            "shards": shards,
            "total_tokens": sum(s["tokens"] for s in shards),
            **meta,
        },
    )


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Shard:
    name: str
    url: str
    tokens: int | None = None  # from the manifest; None when read from a listing
    sha256: str | None = None


def read_manifest(data_url: str) -> dict[str, Any] | None:
    """The store's manifest, or None when there is none; an unreadable one is a ShardError."""
    url = store.join(data_url, MANIFEST)
    if not store.exists(url):
        return None
    try:
        manifest = store.read_json(url)
        if not isinstance(manifest["shards"], list):
            raise TypeError("'shards' is not a list")
        for e in manifest["shards"]:
            ok = isinstance(e, dict) and isinstance(e.get("name"), str) and parse_name(e["name"])
            if not ok or isinstance(e.get("tokens"), bool) or not isinstance(e.get("tokens"), int):
                raise TypeError(
                    f"entry {e!r:.80} is not {{name: a shard's file name, tokens: a count}}"
                )
    except (ValueError, KeyError, TypeError) as err:
        raise ShardError(f"{url}: unreadable shard manifest ({err})") from None
    return manifest


def list_shards(data_url: str, split: str) -> list[Shard]:
    """The split's shards in order: from manifest.json when present, else from the folder listing."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    manifest = read_manifest(data_url)
    if manifest is not None:
        shards = [
            Shard(e["name"], store.join(data_url, e["name"]), int(e["tokens"]), e.get("sha256"))
            for e in manifest["shards"]
            if (parse_name(e["name"]) or ("",))[0] == split
        ]
    else:
        shards = [
            Shard(n, store.join(data_url, n))
            for n in store.listdir(data_url)
            if (parse_name(n) or ("",))[0] == split
        ]
    shards.sort(key=lambda s: (parse_name(s.name) or ("", 0))[1])
    if not shards:
        raise ShardError(f"no {split} shards (*_{split}_NNNNNN.npy) under {data_url}")
    return shards


def npy_bytes(tokens: int) -> int:
    """The size of a shard of `tokens` tokens as np.save writes it (header + data)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.dtype(DTYPE).str, "fortran_order": False, "shape": (tokens,)}
    )
    return header.tell() + tokens * np.dtype(DTYPE).itemsize


def check_sizes(data_url: str) -> None:
    """Every shard the manifest lists has the size its token count gives: one listing, no reads. A truncated
    shard far down the list is found at start, not when training reaches it hours later."""
    manifest = read_manifest(data_url)
    if manifest is None:
        return  # without a manifest there are no sizes to hold the files to
    fs, path = store.fs_and_path(data_url)
    sizes = {
        posixpath.basename(e["name"].rstrip("/")): e.get("size") for e in fs.ls(path, detail=True)
    }
    for e in manifest["shards"]:
        want, got = npy_bytes(int(e["tokens"])), sizes.get(e["name"])
        if got is None:
            raise ShardError(f"shard {e['name']} is missing ({store.join(data_url, e['name'])})")
        if got != want:
            raise ShardError(
                f"shard {e['name']} is {got} bytes; its {e['tokens']} tokens take {want} (truncated or "
                "changed since the manifest)"
            )


def data_fingerprint(data_url: str) -> str:
    """What the shards are, wherever they lie: the manifest's names, token counts and sha256s (without a
    manifest: the names and byte sizes). Checkpoints record it; a resume on other data is refused."""
    manifest = read_manifest(data_url)
    if manifest is not None:
        items = [[e["name"], e["tokens"], e.get("sha256")] for e in manifest["shards"]]
    else:
        fs, path = store.fs_and_path(data_url)
        items = [
            [posixpath.basename(e["name"]), e.get("size")]
            for e in fs.ls(path, detail=True)
            if parse_name(posixpath.basename(e["name"]))
        ]
    return store.sha256(json.dumps(sorted(items)).encode())[:16]


def unigram_entropy(data_url: str, split: str = "train", max_tokens: int = 200_000_000) -> float:
    """The entropy in nats of the split's token frequencies (over its first `max_tokens` tokens): the loss of a
    model that knows only how often each token occurs, the first bar a trained model must clear."""
    counts, seen = np.zeros(VOCAB_SIZE, dtype=np.int64), 0
    for shard in list_shards(data_url, split):
        tokens = load_shard(shard)[: max_tokens - seen]
        counts += np.bincount(tokens, minlength=VOCAB_SIZE)[:VOCAB_SIZE]
        seen += tokens.size
        if seen >= max_tokens:
            break
    p = counts[counts > 0] / seen
    return float(-(p * np.log(p)).sum())


def load_shard(shard: Shard, verify: bool = True) -> np.ndarray:
    """The shard's tokens; a missing file, a checksum mismatch or truncation is a ShardError."""
    try:
        data = store.read_bytes(shard.url)
    except FileNotFoundError:
        raise ShardError(f"shard {shard.name} is missing ({shard.url})") from None
    if verify and shard.sha256 and store.sha256(data) != shard.sha256:
        raise ShardError(
            f"shard {shard.name} fails its sha256 check (corrupt or changed since the manifest)"
        )
    arr = decode(data, shard.name)
    if shard.tokens is not None and arr.size != shard.tokens:
        raise ShardError(
            f"shard {shard.name} has {arr.size} tokens; the manifest says {shard.tokens} (truncated?)"
        )
    return arr
