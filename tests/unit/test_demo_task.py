"""The demo's held-out task (evaluation/demo_task.py): HellaSwag's format, one true word order per example.
Staging HellaSwag into a store: tests/e2e/test_hellaswag_prep.py."""

from evaluation import hellaswag_data as prep


def test_the_demo_task_is_held_out_hellaswag_format_with_one_true_word_order(tmp_path):
    from common.shards import list_shards, load_shard
    from data_prep import pipeline
    from data_prep.sources import DemoSource
    from evaluation import demo_task

    paths = demo_task.build(str(tmp_path / "store"))
    examples = prep.read_examples(paths["data"])  # the same validator as real HellaSwag
    assert len(examples) == 100 and {e["label"] for e in examples} == {0, 1, 2, 3}
    for e in examples:
        true = e["endings"][e["label"]]
        assert all(
            sorted(x.split()) == sorted(true.split()) for x in e["endings"]
        )  # the same words...
        assert len(set(e["endings"])) == 4  # ...in four different orders
    # held out: every context comes from a document of the val shard, which the demo's training never reads
    import numpy as np

    from common.tokenizer import get_encoding

    data = str(tmp_path / "data")
    pipeline.build(data, DemoSource(), workers=1, progress=False)
    val = load_shard(list_shards(data, "val")[0]).tobytes()
    train = b"".join(load_shard(s).tobytes() for s in list_shards(data, "train"))
    held = demo_task.held_out_documents(DemoSource.default_shard_tokens)
    enc = get_encoding()
    for doc in held[:20]:
        tokens = np.array(enc.encode_ordinary(doc), dtype=np.uint16).tobytes()
        assert tokens in val and tokens not in train
    for e in examples:
        doc = held[int(e["source_id"].removeprefix("demo-doc-"))]
        assert all(w in doc for w in e["ctx"].split() + e["endings"][e["label"]].split())
    assert (
        f"task: {demo_task.TASK}"
        in (tmp_path / "store" / "data" / "demo-eval" / "demo_hellaswag.yaml").read_text()
    )
