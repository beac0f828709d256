"""FineWeb-Edu -> GPT-2 token shards (build-nanogpt's fineweb.py layout, byte for byte) on any fsspec URL.

    python -m data_prep.fineweb --source SOURCE --out URL [--shard-tokens N] [--workers K]
    python -m data_prep.fineweb verify URL

SOURCE: `hf:HuggingFaceFW/fineweb-edu:sample-10BT` (the default; also sample-100BT, sample-350BT, optional
`@revision`), parquet/jsonl files with a `text` column or plain text files (.txt/.md/.rst, one document each)
(paths, URLs, folders or globs, comma separated), or `demo` (Python's standard-library docstrings, offline).
Rerunning after a crash or kill resumes from the last finished shard with identical output; a complete store
(manifest.json present) is left as it is.
"""

from __future__ import annotations

import argparse
import os
import sys

from common.cli import entry_point, positive_int
from data_prep import pipeline, verify
from data_prep.sources import DEFAULT_SOURCE, open_source


@entry_point
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["verify"]:
        return verify.main(argv[1:])
    ap = argparse.ArgumentParser(
        prog="python -m data_prep.fineweb",
        description=__doc__.split("\n\n")[0],
        epilog="python -m data_prep.fineweb verify URL: re-read and check every shard",
    )
    ap.add_argument(
        "--source", default=DEFAULT_SOURCE, help=f"hub spec or files (default {DEFAULT_SOURCE})"
    )
    ap.add_argument(
        "--out", required=True, help="fsspec URL of the shard store (local path, s3://...)"
    )
    ap.add_argument(
        "--shard-tokens",
        type=positive_int,
        default=None,
        help=f"tokens per shard (default {pipeline.DEFAULT_SHARD_TOKENS:,}; demo: 100,000)",
    )
    ap.add_argument(
        "--workers",
        type=positive_int,
        default=os.cpu_count() or 1,
        help="tokenizer processes (default: all cores)",
    )
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument(
        "--force",
        action="store_true",
        help="write into --out although it holds other shards or files",
    )
    args = ap.parse_args(argv)
    source = open_source(args.source)
    manifest = pipeline.build(
        args.out,
        source,
        args.shard_tokens,
        args.workers,
        progress=not args.no_progress,
        force=args.force,
    )
    print(
        f"{args.out}: {len(manifest['shards'])} shards, {manifest['total_tokens']:,} tokens, "
        f"{manifest['documents']:,} documents"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
