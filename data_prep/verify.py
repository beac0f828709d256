"""Re-read a shard store and check every shard against its manifest and the shard format (common/shards.py).

Checks: the manifest is there and lists shards 0..n-1 (val first) in order; each shard exists, is a 1-D
uint16 `.npy` with the recorded token count and sha256, holds only GPT-2 ids, and all but the last have
`shard_tokens` tokens; the totals add up. Shard files the manifest does not list are reported as notes
(the training loader ignores them).

    python -m data_prep.verify URL      (also: python -m data_prep.fineweb verify URL)
"""

from __future__ import annotations

import argparse
import sys

from common import exit_codes, store
from common.cli import entry_point
from common.shards import (
    MANIFEST,
    ShardError,
    decode,
    max_token_outside_vocab,
    parse_name,
    read_manifest,
    split_of,
)
from common.tokenizer import VOCAB_SIZE


def verify(url: str, progress: bool = False) -> tuple[list[str], list[str]]:
    """(problems, notes) for the store at `url`; no problems means every shard checks out."""
    from tqdm import tqdm

    manifest_url = store.join(url, MANIFEST)
    try:
        manifest = read_manifest(url)
    except ShardError as err:
        return [str(err)], []
    if manifest is None:
        return [f"{manifest_url}: missing (the store is incomplete or not a shard store)"], []
    entries = manifest["shards"]
    problems: list[str] = [] if entries else ["manifest lists no shards"]
    shard_tokens = manifest.get("shard_tokens")
    total = 0
    for i, e in enumerate(tqdm(entries, desc="verifying", unit="shard", disable=not progress)):
        name = e.get("name", "?")
        if parse_name(name) != (split_of(i), i):
            problems.append(f"{name}: expected shard {i} ({split_of(i)}) at this position")
        try:
            data = store.read_bytes(store.join(url, name))
        except FileNotFoundError:
            problems.append(f"{name}: missing")
            continue
        if store.sha256(data) != e.get("sha256"):
            problems.append(f"{name}: sha256 mismatch (corrupt or changed since the manifest)")
        try:
            arr = decode(data, name)
        except ShardError as err:
            problems.append(str(err))
            continue
        if arr.size != e.get("tokens"):
            problems.append(f"{name}: {arr.size} tokens, manifest says {e.get('tokens')}")
        if (bad := max_token_outside_vocab(arr)) is not None:
            problems.append(f"{name}: token id {bad} is not a GPT-2 id (>= {VOCAB_SIZE})")
        if shard_tokens and i < len(entries) - 1 and arr.size != shard_tokens:
            problems.append(
                f"{name}: {arr.size} tokens in a non-final shard, expected {shard_tokens}"
            )
        total += int(arr.size)
    if "total_tokens" in manifest and total != manifest["total_tokens"] and not problems:
        problems.append(
            f"shards hold {total} tokens, manifest total_tokens says {manifest['total_tokens']}"
        )
    listed = {e.get("name") for e in entries}
    notes = [
        f"{n}: not in the manifest (ignored by training)"
        for n in store.listdir(url)
        if parse_name(n) and n not in listed
    ]
    return problems, notes


@entry_point
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m data_prep.verify", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("url", help="the shard store (fsspec URL)")
    args = ap.parse_args(argv)
    store.preflight(args.url, write=False)
    problems, notes = verify(args.url, progress=sys.stderr.isatty())
    for n in notes:
        print(f"note: {n}")
    for p in problems:
        print(f"FAIL: {p}")
    if problems:
        print(f"{args.url}: {len(problems)} problem(s)", file=sys.stderr)
        return exit_codes.FAILED
    m = read_manifest(args.url) or {"shards": [], "total_tokens": 0}  # verified: it is there
    print(f"{args.url}: OK, {len(m['shards'])} shards, {m['total_tokens']:,} tokens")
    return exit_codes.OK


if __name__ == "__main__":
    raise SystemExit(main())
