"""A real-text corpus this machine can get from its package registries, for the recipe comparison: the Python
documentation's reStructuredText sources from Debian's `python3.11-doc` package (~500 documents, ~12 MB of
text, ~3M GPT-2 tokens), tokenized by the project's own data prep into shards with a held-out val shard, and
a HellaSwag-format task made from the held-out documents as the demo's is (evaluation/demo_task.py).

    python bench/prepare_pydoc.py --out store/data/pydoc            # apt-get download, then data prep
    python bench/prepare_pydoc.py --out store/data/pydoc --deb FILE # a package already downloaded

Writes `{out}/` (shards and manifest; documents in a seeded shuffled order, so that the val shard is a sample
of the whole documentation) and `{out}-eval/pydoc_hellaswag.{jsonl,yaml}` (the task; the yaml for lm-eval's
--include_path).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PACKAGE = "python3.11-doc"
VAL_TOKENS = 200_000  # the first shard: held out from training, and the task's documents
TASK = "pydoc_hellaswag"


def documents(deb: Path | None, work: Path) -> list[str]:
    if deb is None:
        subprocess.run(["apt-get", "download", PACKAGE], cwd=work, check=True)
        deb = next(work.glob(f"{PACKAGE}_*.deb"))
    tree = work / "tree"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True)
    # python3.11-doc/html is a link to python3.11/html: each file once, by its real path
    files = sorted(
        {f.resolve() for f in tree.glob("usr/share/doc/python3*/html/_sources/**/*.txt")}
    )
    if not files:
        raise SystemExit(f"{deb}: no documentation sources in it")
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    random.Random(0).shuffle(texts)
    return texts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="the shards' folder")
    ap.add_argument(
        "--deb", type=Path, help=f"the {PACKAGE} package file (default: apt-get download)"
    )
    ap.add_argument("--shard-tokens", type=int, default=VAL_TOKENS)
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args(argv)
    from data_prep import pipeline
    from data_prep.sources import TextsSource
    from evaluation.demo_task import examples, held_out_documents, lm_eval_yaml

    with tempfile.TemporaryDirectory() as tmp:
        texts = documents(a.deb, Path(tmp))
    manifest = pipeline.build(
        a.out, TextsSource(texts, name=PACKAGE), a.shard_tokens, a.workers, progress=True
    )
    held = held_out_documents(a.shard_tokens, texts)
    task = Path(f"{a.out.rstrip('/')}-eval")
    task.mkdir(parents=True, exist_ok=True)
    data = task / f"{TASK}.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in examples(held, a.examples, name="pydoc")))
    (task / f"{TASK}.yaml").write_text(lm_eval_yaml(str(data.resolve()), TASK))
    tokens = sum(s["tokens"] for s in manifest["shards"])
    print(
        f"{len(texts)} documents, {tokens:,} tokens in {len(manifest['shards'])} shards at {a.out} "
        f"(val: the first {a.shard_tokens:,}); task: {data} ({a.examples} examples from "
        f"{len(held)} held-out documents)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
