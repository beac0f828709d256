"""A real-text corpus this machine can get from its package registries, for the recipe comparison: the English
documentation of Debian packages, tokenized by the project's own data prep into shards with a held-out val
shard, and a HellaSwag-format task made from the held-out documents as the demo's is (evaluation/demo_task.py).

    python bench/prepare_docs.py --out store/data/docs                  # every package below: 22.5M tokens
    python bench/prepare_docs.py --out store/data/pydoc --packages python3.11-doc   # ~3.5M tokens
    python bench/prepare_docs.py --out store/data/docs --debs DIR       # packages already downloaded there

The packages and what is read of each (text as written by its authors; markup is left in, HTML is reduced to
its text):
    python3.11-doc     the reStructuredText sources of the Python documentation         ~12 MB of text
    linux-doc-6.1      the kernel documentation's reStructuredText, without translations  ~21 MB
    perl-doc           Perl's POD manual pages                                             ~9 MB
    git-doc            Git's AsciiDoc manual pages and guides                              ~3 MB
    postgresql-doc-15  the PostgreSQL manual (HTML)                                        ~8 MB
    rust-doc           the Rust books (the book, the reference, ...) and std's API docs   ~17 MB

Writes `{out}/` (shards and manifest; documents in a seeded shuffled order, so that the val shard is a sample
of the whole) and `{out}-eval/{name}_hellaswag.{jsonl,yaml}` (the task; the yaml for lm-eval's --include_path).
"""

from __future__ import annotations

import argparse
import html.parser
import json
import random
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VAL_TOKENS = 200_000  # the first shard: held out from training, and the task's documents


class _Text(html.parser.HTMLParser):
    """An HTML page's text: paragraphs kept apart, navigation, scripts and styles left out."""

    SKIP = {"script", "style", "nav", "head", "footer"}
    BREAK = {"p", "div", "li", "h1", "h2", "h3", "h4", "h5", "pre", "br", "tr", "dt", "dd", "table"}

    def __init__(self) -> None:
        super().__init__()
        self.out: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skipping += 1
        if tag in self.BREAK:
            self.out.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.skipping:
            self.skipping -= 1

    def handle_data(self, data):
        if not self.skipping:
            self.out.append(data)


def html_text(page: str) -> str:
    p = _Text()
    p.feed(page)
    return re.sub(r"\n\s*\n+", "\n\n", "".join(p.out)).strip()


def _files(tree: Path, pattern: str, skip: Callable[[Path], bool] = lambda f: False) -> list[Path]:
    # each file once, by its real path (a -doc package often links one folder to another)
    return sorted({f.resolve() for f in tree.glob(pattern) if f.is_file() and not skip(f)})


def _rust_skip(f: Path) -> bool:
    parts = f.parts[f.parts.index("html") + 1 :]
    # print.html repeats a whole book; core and alloc repeat std's API; src is code
    return f.name == "print.html" or parts[0] in {"core", "alloc", "proc_macro", "test", "src"}


# package -> (the files, whether they are HTML)
PACKAGES: dict[str, tuple[Callable[[Path], list[Path]], bool]] = {
    "python3.11-doc": (lambda t: _files(t, "usr/share/doc/python3*/html/_sources/**/*.txt"), False),
    "linux-doc-6.1": (
        lambda t: _files(
            t,
            "usr/share/doc/linux-doc-6.1/html/_sources/**/*.txt",
            lambda f: "translations" in f.parts,
        ),
        False,
    ),
    "perl-doc": (lambda t: _files(t, "usr/share/perl/*/pod/*.pod"), False),
    "git-doc": (lambda t: _files(t, "usr/share/doc/git-doc/**/*.txt"), False),
    "postgresql-doc-15": (lambda t: _files(t, "usr/share/doc/postgresql-doc-15/html/*.html"), True),
    "rust-doc": (lambda t: _files(t, "usr/share/doc/rust-doc/html/**/*.html", _rust_skip), True),
}


def package_documents(package: str, debs: Path, work: Path) -> list[str]:
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        subprocess.run(["apt-get", "download", package], cwd=debs, check=True)
        found = sorted(debs.glob(f"{package}_*.deb"))
    tree = work / package
    subprocess.run(["dpkg-deb", "-x", str(found[-1]), str(tree)], check=True)
    files, is_html = PACKAGES[package]
    texts = []
    for f in files(tree):
        text = f.read_text(encoding="utf-8", errors="replace")
        text = html_text(text) if is_html else text
        if not is_html or len(text) >= 200:  # a redirect or an empty index page is not a document
            texts.append(text)
    if not texts:
        raise SystemExit(f"{found[-1]}: no documents in it")
    return texts


def documents(packages: list[str], debs: Path) -> Iterator[tuple[str, list[str]]]:
    with tempfile.TemporaryDirectory() as tmp:
        for package in packages:
            yield package, package_documents(package, debs, Path(tmp))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="the shards' folder")
    ap.add_argument(
        "--packages",
        default=",".join(PACKAGES),
        help=f"comma-separated, of: {', '.join(PACKAGES)} (default: all)",
    )
    ap.add_argument(
        "--debs",
        type=Path,
        help="a folder with the packages' .deb files (default: apt-get download)",
    )
    ap.add_argument("--shard-tokens", type=int, default=VAL_TOKENS)
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--task", help="the task's name (default: {out folder's name}_hellaswag)")
    a = ap.parse_args(argv)
    packages = [p for p in a.packages.split(",") if p]
    unknown = [p for p in packages if p not in PACKAGES]
    if unknown:
        ap.error(f"unknown package {unknown[0]!r}: one of {', '.join(PACKAGES)}")
    from data_prep import pipeline
    from data_prep.sources import TextsSource
    from evaluation.demo_task import examples, held_out_documents, lm_eval_yaml

    texts: list[str] = []
    with tempfile.TemporaryDirectory() as dl:
        for package, docs in documents(packages, a.debs or Path(dl)):
            print(
                f"{package}: {len(docs)} documents, {sum(map(len, docs)) / 1e6:.1f} MB", flush=True
            )
            texts += docs
    random.Random(0).shuffle(texts)
    name = packages[0] if len(packages) == 1 else "+".join(packages)
    manifest = pipeline.build(
        a.out, TextsSource(texts, name=name), a.shard_tokens, a.workers, progress=True
    )
    held = held_out_documents(a.shard_tokens, texts)
    out = a.out.rstrip("/")
    task_name = a.task or f"{Path(out).name}_hellaswag"
    task = Path(f"{out}-eval")
    task.mkdir(parents=True, exist_ok=True)
    data = task / f"{task_name}.jsonl"
    short = task_name.removesuffix("_hellaswag")
    data.write_text("".join(json.dumps(e) + "\n" for e in examples(held, a.examples, name=short)))
    (task / f"{task_name}.yaml").write_text(lm_eval_yaml(str(data.resolve()), task_name))
    tokens = sum(s["tokens"] for s in manifest["shards"])
    print(
        f"{len(texts)} documents, {tokens:,} tokens in {len(manifest['shards'])} shards at {a.out} "
        f"(val: the first {a.shard_tokens:,}); task: {data} ({a.examples} examples from "
        f"{len(held)} held-out documents)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
