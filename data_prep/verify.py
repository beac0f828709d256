"""Re-read a shard store and check every shard against its manifest.

Checks: the manifest is there and lists shards 0..n-1 (val first) in order; each shard exists, is a 1-D
uint16 `.npy` with the recorded token count and sha256, holds only GPT-2 ids (< 50257), and all but the last
have `shard_tokens` tokens; the totals add up. Shard files the manifest does not list are reported as notes
(the training loader ignores them).

    python -m data_prep.verify URL      (also: python -m data_prep.fineweb verify URL)
"""

from __future__ import annotations

import hashlib
import io
import re
import sys
from typing import Any

import numpy as np

from data_prep.shards import MANIFEST
from training import store

VOCAB = 50257
_NAME_RE = re.compile(r"^(.+)_(train|val)_(\d{6})\.npy$")


def verify(url: str, progress: bool = False) -> tuple[list[str], list[str]]:
    """(problems, notes) for the store at `url`; no problems means every shard checks out."""
    from tqdm import tqdm

    problems: list[str] = []
    manifest_url = store.join(url, MANIFEST)
    if not store.exists(manifest_url):
        return [f"{manifest_url}: missing (the store is incomplete or not a shard store)"], []
    try:
        manifest: dict[str, Any] = store.read_json(manifest_url)
        entries = manifest["shards"]
    except (ValueError, KeyError, TypeError) as err:
        return [f"{manifest_url}: unreadable ({err})"], []
    if not entries:
        problems.append("manifest lists no shards")
    shard_tokens = manifest.get("shard_tokens")
    total = 0
    for i, e in enumerate(tqdm(entries, desc="verifying", unit="shard", disable=not progress)):
        name = e.get("name", "?")
        m = _NAME_RE.match(name)
        if not m or int(m.group(3)) != i or m.group(2) != ("val" if i == 0 else "train"):
            problems.append(f"{name}: expected shard {i} ({'val' if i == 0 else 'train'}) at this position")
        try:
            data = store.read_bytes(store.join(url, name))
        except FileNotFoundError:
            problems.append(f"{name}: missing")
            continue
        if hashlib.sha256(data).hexdigest() != e.get("sha256"):
            problems.append(f"{name}: sha256 mismatch (corrupt or changed since the manifest)")
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as err:
            problems.append(f"{name}: not a readable .npy ({err})")
            continue
        if arr.dtype != np.uint16 or arr.ndim != 1:
            problems.append(f"{name}: {arr.dtype} {arr.shape}, expected 1-D uint16")
            continue
        if arr.size != e.get("tokens"):
            problems.append(f"{name}: {arr.size} tokens, manifest says {e.get('tokens')}")
        if arr.size and int(arr.max()) >= VOCAB:
            problems.append(f"{name}: token id {int(arr.max())} is not a GPT-2 id (>= {VOCAB})")
        if shard_tokens and i < len(entries) - 1 and arr.size != shard_tokens:
            problems.append(f"{name}: {arr.size} tokens in a non-final shard, expected {shard_tokens}")
        total += int(arr.size)
    if "total_tokens" in manifest and total != manifest["total_tokens"] and not problems:
        problems.append(f"shards hold {total} tokens, manifest total_tokens says {manifest['total_tokens']}")
    listed = {e.get("name") for e in entries}
    notes = [f"{n}: not in the manifest (ignored by training)" for n in store.listdir(url)
             if _NAME_RE.match(n) and n not in listed]
    return problems, notes


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m data_prep.verify", description=__doc__.split("\n\n")[0])
    ap.add_argument("url", help="the shard store (fsspec URL)")
    args = ap.parse_args(argv)
    try:
        store.preflight(args.url, write=False)
    except store.StoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    problems, notes = verify(args.url, progress=sys.stderr.isatty())
    for n in notes:
        print(f"note: {n}")
    for p in problems:
        print(f"FAIL: {p}")
    if problems:
        print(f"{args.url}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    m = store.read_json(store.join(args.url, MANIFEST))
    print(f"{args.url}: OK, {len(m['shards'])} shards, {m['total_tokens']:,} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
