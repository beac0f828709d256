"""Stage HellaSwag's validation set into the store, where the evaluation looks for it:
`{store}/data/hellaswag/hellaswag_val.jsonl` (the jsonl build-nanogpt downloads, one example a line with
`ctx`, `endings` (4), `label` (0-3)).

    python -m data_prep.hellaswag --out STORE_URL [--source FILE_OR_URL]

Without --source, the file is fetched from build-nanogpt's URL. Every line is validated before anything is
written; a store that already holds the same bytes is left as it is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

from training import store

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
FULL_SIZE = 10_042


class HellaSwagSourceError(ValueError):
    pass


def target_url(store_url: str) -> str:
    return store.join(store_url, "data", "hellaswag", "hellaswag_val.jsonl")


def validate(data: bytes, where: str) -> int:
    """Number of examples; raises on the first line that is not a HellaSwag example."""
    n = 0
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise HellaSwagSourceError(f"{where}: not UTF-8 text") from None
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            ex = json.loads(line)
            ok = (isinstance(ex["ctx"], str) and isinstance(ex["endings"], list) and len(ex["endings"]) == 4
                  and all(isinstance(e, str) for e in ex["endings"]) and int(ex["label"]) in range(4))
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise HellaSwagSourceError(f"{where} line {i}: not a HellaSwag example (ctx, 4 endings, label 0-3)")
        n += 1
    if not n:
        raise HellaSwagSourceError(f"{where}: no examples")
    return n


def _read_source(source: str) -> bytes:
    try:
        if source.startswith(("http://", "https://")):
            import urllib.request

            with urllib.request.urlopen(source, timeout=60) as r:
                return r.read()
        return store.read_bytes(source)
    except FileNotFoundError:
        raise HellaSwagSourceError(f"{source}: no such file") from None
    except Exception as err:
        raise HellaSwagSourceError(f"cannot read {source}: {type(err).__name__}: {err}") from None


def stage(store_url: str, source: str = URL) -> dict:
    data = _read_source(source)
    n = validate(data, source)
    dst = target_url(store_url)
    sha = hashlib.sha256(data).hexdigest()
    unchanged = store.exists(dst) and hashlib.sha256(store.read_bytes(dst)).hexdigest() == sha
    if not unchanged:
        store.write_bytes(dst, data)  # atomic: the evaluation never sees half a file
    return {"url": dst, "examples": n, "sha256": sha, "written": not unchanged}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_prep.hellaswag", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="store root URL (the file goes to OUT/data/hellaswag/)")
    ap.add_argument("--source", default=URL, help="local file or URL of hellaswag_val.jsonl (default: download)")
    args = ap.parse_args(argv)
    try:
        store.preflight(args.out, write=True)
        r = stage(args.out, args.source)
    except (HellaSwagSourceError, store.StoreError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    note = "" if r["examples"] == FULL_SIZE else f" (the full validation set has {FULL_SIZE:,})"
    print(f"{r['url']}: {r['examples']:,} examples{note}, {'written' if r['written'] else 'already there'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
