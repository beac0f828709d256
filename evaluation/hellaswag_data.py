"""HellaSwag's validation set: its format, where it lives in a store, and staging it there.

The file is the jsonl build-nanogpt downloads: one example a line with `ctx` (a string), `endings` (4 strings)
and `label` (0-3). Staging validates every line before anything is written and puts the file where the
evaluation looks for it, `{store}/data/hellaswag/hellaswag_val.jsonl`; a store that already holds the same
bytes is left as it is.

    python -m evaluation.hellaswag_data --out STORE_URL [--source FILE_OR_URL]   (default: download)
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from common import store
from common.cli import entry_point
from common.errors import BadInput
from common.layout import StoreLayout

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
FULL_SIZE = 10_042


class HellaSwagDataError(BadInput, ValueError):
    """A HellaSwag file that is missing, unreadable or not in HellaSwag's format; the message names the line."""


def _label(value: Any) -> int | None:
    # jsonl files carry ints, Hugging Face's copy carries digit strings; 2.7 or True is not a label
    if isinstance(value, int) and not isinstance(value, bool):
        return value if 0 <= value < 4 else None
    if isinstance(value, str) and value.strip() in ("0", "1", "2", "3"):
        return int(value)
    return None


def parse_examples(data: bytes, where: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The examples (label as an int), up to `limit`; the first line that is not an example is an error."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise HellaSwagDataError(f"{where}: not UTF-8 text") from None
    examples = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            ex = json.loads(line)
            label = _label(ex["label"])
            # an empty context or ending is no question: every model would score it alike, or at 1.0
            ok = (
                isinstance(ex["ctx"], str)
                and bool(ex["ctx"].strip())
                and isinstance(ex["endings"], list)
                and len(ex["endings"]) == 4
                and all(isinstance(e, str) and e.strip() for e in ex["endings"])
                and label is not None
            )
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise HellaSwagDataError(
                f"{where} line {i}: not a HellaSwag example (a context, 4 endings, none of them "
                "empty, a label 0-3)"
            )
        examples.append({**ex, "label": label})
        if limit and len(examples) >= limit:
            break
    if not examples:
        raise HellaSwagDataError(f"{where}: no examples")
    return examples


def read_examples(url: str, limit: int | None = None) -> list[dict[str, Any]]:
    return parse_examples(read_data(url), url, limit)


def read_data(url: str) -> bytes:
    """The file's bytes (parse_examples reads them; their sha256 keys the evaluations cached against them)."""
    try:
        return store.read_bytes(url)
    except FileNotFoundError:
        raise HellaSwagDataError(f"{url}: no such file") from None


def _read_source(source: str) -> bytes:
    try:
        if source.startswith(("http://", "https://")):
            import urllib.request

            with urllib.request.urlopen(source, timeout=60) as r:
                return r.read()
        return store.read_bytes(source)
    except FileNotFoundError:
        raise HellaSwagDataError(f"{source}: no such file") from None
    except Exception as err:  # urllib/fsspec errors differ by backend; the message is what matters
        raise HellaSwagDataError(f"cannot read {source}: {type(err).__name__}: {err}") from None


def stage(store_url: str, source: str = URL, force: bool = False) -> dict[str, Any]:
    """Validate `source` and write it to the store's HellaSwag location (unless the same bytes are there).
    Other bytes there are replaced only with `force`: evaluations cached against them would no longer match."""
    data = _read_source(source)
    n = len(parse_examples(data, source))
    dst = StoreLayout(store_url).hellaswag
    digest = store.sha256(data)
    there = store.sha256(store.read_bytes(dst)) if store.exists(dst) else None
    if there not in (None, digest) and not force:
        raise HellaSwagDataError(
            f"{dst} holds another HellaSwag file (sha256 {there[:12]}, {source} is "
            f"{digest[:12]}); evaluations already cached against it would no longer match: "
            "pass --force to replace it"
        )
    unchanged = there == digest
    if not unchanged:
        store.write_bytes(dst, data)  # atomic: the evaluation never sees half a file
    return {"url": dst, "examples": n, "sha256": digest, "written": not unchanged}


@entry_point
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m evaluation.hellaswag_data", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument(
        "--out", required=True, help="store root URL (the file goes to OUT/data/hellaswag/)"
    )
    ap.add_argument(
        "--source", default=URL, help="local file or URL of hellaswag_val.jsonl (default: download)"
    )
    ap.add_argument(
        "--force", action="store_true", help="replace another HellaSwag file already in the store"
    )
    args = ap.parse_args(argv)
    store.preflight(args.out, write=True)
    r = stage(args.out, args.source, force=args.force)
    note = "" if r["examples"] == FULL_SIZE else f" (the full validation set has {FULL_SIZE:,})"
    print(
        f"{r['url']}: {r['examples']:,} examples{note}, {'written' if r['written'] else 'already there'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
