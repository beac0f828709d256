"""An offline HellaSwag-format task for the demo corpus, so that every demo checkpoint is evaluated the way a
real run's are: by our HellaSwag scorer and by lm-eval, over the same file.

Each example takes a sentence of a held-out document (one in the demo dataset's val shard, which training never
reads) as its context; its true ending is the sentence that follows it there, the three others are the same
words in shuffled orders. Every ending has the same words, so a model that knows only how often words occur
is at chance (0.25); what lifts a checkpoint above it is what it learned of word order.

    python -m evaluation.demo_task --store store      ->  {store}/data/demo-eval/demo_hellaswag.jsonl
                                                          {store}/data/demo-eval/demo_hellaswag.yaml (lm-eval task)
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path
from typing import Any

from common import store
from common.cli import entry_point
from common.errors import BadInput
from common.layout import StoreLayout

TASK = "demo_hellaswag"
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\]'\"][.!?])\s+(?=[A-Z])")


def sentences(document: str) -> list[list[str]]:
    """The document's paragraphs as lists of prose sentences (code blocks and tables are left out)."""
    out = []
    for para in re.split(r"\n\s*\n", document):
        lines = para.strip().splitlines()
        if not lines or any(ln.startswith((" ", "\t", ">>>", "|", "-")) for ln in lines):
            continue
        text = " ".join(ln.strip() for ln in lines)
        out.append([s for s in _SENTENCE_END.split(text) if 20 <= len(s) <= 240])
    return [p for p in out if p]


def held_out_documents(shard_tokens: int, docs: list[str] | None = None) -> list[str]:
    """The documents wholly in a dataset's val shard (the demo's, or that of `docs` in the order the pipeline
    tokenized them): the pipeline cuts the same token stream."""
    from common.tokenizer import get_encoding
    from data_prep.sources import DemoSource

    enc = get_encoding()
    docs = DemoSource().texts if docs is None else docs
    tokens, held = 0, 0
    for doc in docs:
        tokens += 1 + len(enc.encode_ordinary(doc))
        if tokens > shard_tokens:
            break
        held += 1
    return docs[:held]


def _shuffled(sentence: str, rng: random.Random, avoid: set[str]) -> str | None:
    words = sentence.split()
    for _ in range(20):
        rng.shuffle(words)
        candidate = " ".join(words)
        if candidate not in avoid:
            return candidate
    return None


def examples(
    held_out: list[str], n: int = 100, seed: int = 0, name: str = "demo"
) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    pairs = [
        (doc_i, a, b)
        for doc_i, doc in enumerate(held_out)
        for para in sentences(doc)
        for a, b in zip(para, para[1:])
        if len(b.split()) >= 5
    ]
    rng.shuffle(pairs)
    out: list[dict] = []
    for doc_i, ctx, true in sorted(pairs, key=lambda p: p[0]):
        endings = {true}
        for _ in range(3):
            if (s := _shuffled(true, rng, endings)) is not None:
                endings.add(s)
        if len(endings) < 4:
            continue
        wrong = sorted(endings - {true})
        label = rng.randrange(4)
        out.append(
            {
                "ind": len(out),
                "ctx": ctx,
                "endings": wrong[:label] + [true] + wrong[label:],
                "label": label,
                "source_id": f"{name}-doc-{doc_i}",
            }
        )
        if len(out) == n:
            return out
    raise BadInput(f"the {name} corpus gives only {len(out)} held-out examples; {n} wanted")


def lm_eval_yaml(data_path: str, task: str = TASK) -> str:
    """An lm-eval task over the same file, scored like HellaSwag (multiple choice, acc and acc_norm)."""
    return (
        f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    validation: {data_path}\n"
        'validation_split: validation\noutput_type: multiple_choice\ndoc_to_text: "{{ctx}}"\n'
        'doc_to_target: "{{label}}"\ndoc_to_choice: "{{endings}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )


def build(store_url: str, n: int = 100) -> dict[str, str]:
    """Write the task (and its lm-eval definition) into a local store; an existing one is left as it is."""
    from data_prep.sources import DemoSource

    if not store.is_local(store_url):
        raise BadInput(
            f"the demo task is for a local store (lm-eval reads its task files locally), not {store_url}"
        )
    folder = Path(store.fs_and_path(StoreLayout(store_url).demo_eval)[1]).resolve()
    data, task = folder / f"{TASK}.jsonl", folder / f"{TASK}.yaml"
    if not data.exists():
        held = held_out_documents(DemoSource.default_shard_tokens)
        store.write_bytes(
            str(data), "".join(json.dumps(e) + "\n" for e in examples(held, n)).encode()
        )
    if not task.exists():
        store.write_bytes(str(task), lm_eval_yaml(str(data)).encode())
    return {"data": str(data), "include_path": str(folder), "task": TASK}


@entry_point
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m evaluation.demo_task", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--store", default="store", help="the local store (default: ./store)")
    args = ap.parse_args(argv)
    print(json.dumps(build(args.store)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
