"""An offline demo corpus: the docstrings of Python's standard library, one document per module.

Real English prose and code comments, present on every machine with Python, read with `ast` (nothing is
imported or executed). It gives the demo and the tests token shards in the real format without a download:

    python -m data_prep.demo_corpus --out store/data/demo [--shard-tokens 100000]
"""

from __future__ import annotations

import argparse
import ast
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

import numpy as np

from data_prep.shards import shard_name, write_manifest, write_shard
from training import store


def stdlib_documents(max_docs: int | None = None) -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    n = 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "test/", "idlelib/", "lib2to3/tests/")) or "/tests/" in rel:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        parts = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    parts.append(doc.strip())
        if parts:
            yield "\n\n".join(parts)
            n += 1
            if max_docs and n >= max_docs:
                return


def build(out_url: str, shard_tokens: int = 100_000, max_shards: int = 6) -> dict:
    """Tokenize the corpus ([<|endoftext|>] + text per document) into a val shard and train shards."""
    from training.tokenizer import get_encoding

    enc = get_encoding()
    eot = enc.eot_token
    buf = np.empty(shard_tokens, dtype=np.uint16)
    fill, index, records = 0, 0, []
    for doc in stdlib_documents():
        toks = np.array([eot] + enc.encode_ordinary(doc), dtype=np.uint16)
        while toks.size:
            take = min(toks.size, shard_tokens - fill)
            buf[fill : fill + take] = toks[:take]
            fill, toks = fill + take, toks[take:]
            if fill == shard_tokens:
                records.append(write_shard(out_url, shard_name("val" if index == 0 else "train", index), buf))
                index, fill = index + 1, 0
                if index >= max_shards:
                    break
        if index >= max_shards:
            break
    if fill and index < max_shards:
        records.append(write_shard(out_url, shard_name("val" if index == 0 else "train", index), buf[:fill].copy()))
    write_manifest(out_url, records, source={"kind": "python-stdlib-docstrings", "python": sys.version.split()[0]})
    return {"shards": len(records), "tokens": sum(r["tokens"] for r in records)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_prep.demo_corpus", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="store/data/demo", help="fsspec URL for the shards")
    ap.add_argument("--shard-tokens", type=int, default=100_000)
    ap.add_argument("--max-shards", type=int, default=6)
    args = ap.parse_args(argv)
    if store.exists(store.join(args.out, "manifest.json")):
        print(f"{args.out}: already prepared")
        return 0
    stats = build(args.out, args.shard_tokens, args.max_shards)
    print(f"wrote {stats['shards']} shards, {stats['tokens']:,} tokens to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
