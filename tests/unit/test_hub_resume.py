"""HubSource resumes by parquet metadata: the same documents, in the same order, as `datasets` streaming.

The hub cannot be reached here, so the datasets are local ones read through the same `datasets` builders
("parquet", "json") that HuggingFaceFW/fineweb-edu goes through.
"""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.sources import BATCH_DOCS, HubSource, SourceError

SIZES = (230, 170, 260)  # documents per file; row groups of 50 split them unevenly
ROW_GROUP = 50
WORDS = [
    "the",
    "model",
    "reads",
    "Über",
    "données",
    "数据",
    "tokens",
    "of",
    "a",
    "shard",
    "\n",
    "<|endoftext|>",
]


def texts_of(batches, start_doc):
    """All texts of `batches(start_doc)`, checking that each batch starts where the previous one ended."""
    got, index = [], start_doc
    for first, texts in batches:
        assert first == index
        texts = texts.to_pylist() if hasattr(texts, "to_pylist") else list(texts)
        assert texts, "an empty batch"
        got += texts
        index += len(texts)
    return got


def streamed(builder, data_files, start_doc):
    """What `datasets` streaming yields after skipping start_doc documents (the reference order)."""
    import datasets

    ds = datasets.load_dataset(builder, data_files=data_files, split="train", streaming=True)
    return [ex["text"] for ex in (ds.skip(start_doc) if start_doc else ds)]


def write_fineweb_parquet(path, docs, seed):
    n, rng = len(docs), np.random.default_rng(seed)
    table = pa.table(
        {
            "text": docs,
            "id": [f"<urn:uuid:{seed}-{i}>" for i in range(n)],
            "dump": ["CC-MAIN-2024-10"] * n,
            "url": [f"https://example.org/{seed}/{i}" for i in range(n)],
            "file_path": ["s3://commoncrawl/crawl-data/x.warc.gz"] * n,
            "language": ["en"] * n,
            "language_score": rng.uniform(0.65, 1.0, n),
            "token_count": [len(d.split()) for d in docs],
            "score": rng.uniform(2.5, 5.0, n),
            "int_score": rng.integers(3, 6, n),
        }
    )
    pq.write_table(table, path, row_group_size=ROW_GROUP)


@pytest.fixture(scope="module")
def hub_files(tmp_path_factory):
    """Three FineWeb-Edu-schema parquet files, listed out of name order (the list order is the dataset's)."""
    d = tmp_path_factory.mktemp("hub-parquet")
    rng = np.random.default_rng(0)
    files = []
    for i, (name, n) in enumerate(zip(["002_00000", "000_00000", "001_00000"], SIZES)):
        # documents of a few hundred words, so the data pages are most of each file
        docs = [
            f"{name}:{j} " + " ".join(rng.choice(WORDS, rng.integers(0, 400))) for j in range(n)
        ]
        docs[3] = ""
        write_fineweb_parquet(d / f"{name}.parquet", docs, seed=i)
        files.append(str(d / f"{name}.parquet"))
    return files


def hub(files):
    return HubSource(
        "parquet", None, load_kwargs={"data_files": files}
    )  # as tests/unit/test_data_prep.py


# starts: the beginning, inside the third file's second row group, the exact total, beyond it
@pytest.mark.parametrize("start", [0, SIZES[0] + SIZES[1] + 73, sum(SIZES), sum(SIZES) + 9])
def test_parquet_hub_resume_yields_what_streaming_yields(hub_files, start):
    src = hub(hub_files)
    assert (
        src._parquet_urls(src._builder()) == hub_files
    )  # the metadata path, in the builder's file order
    expected = streamed("parquet", hub_files, start)
    assert len(expected) == max(0, sum(SIZES) - start)
    assert texts_of(src.batches(start), start) == expected
    if start == 0:  # a sanity check of the reference itself: file after file, in list order
        assert [t.split(" ")[0] for t in expected[:1] + expected[-1:]] == [
            "002_00000:0",
            f"001_00000:{SIZES[2] - 1}",
        ]


def test_resume_skips_the_first_file_by_its_footer_without_reading_its_data(hub_files, tmp_path):
    files = []
    for f in hub_files:  # a private copy: this test corrupts it
        files.append(str(tmp_path / f.rsplit("/", 1)[1]))
        with open(f, "rb") as a, open(files[-1], "wb") as b:
            b.write(a.read())
    starts = [SIZES[0], SIZES[0] + 61]  # the first document of the second file, and one inside it
    expected = {s: streamed("parquet", files, s) for s in starts}

    # Overwrite the first file's data pages (everything between the leading magic and the footer) with noise.
    raw = bytearray(open(files[0], "rb").read())
    footer = (
        int.from_bytes(raw[-8:-4], "little") + 8
    )  # footer metadata, its length and the trailing magic
    assert len(raw) - footer > 4 * footer, (
        "the file is mostly footer: corrupting its data would prove little"
    )
    raw[4:-footer] = (
        np.random.default_rng(1).integers(0, 256, len(raw) - 4 - footer, dtype=np.uint8).tobytes()
    )
    with open(files[0], "wb") as f:
        f.write(raw)
    assert pq.ParquetFile(files[0]).metadata.num_rows == SIZES[0]  # the footer still reads ...
    with pytest.raises(Exception):  # noqa: B017 (any read error: the point is what comes after)
        pq.read_table(
            files[0], columns=["text"]
        )  # ... but the data does not: reading it would fail the test
    with pytest.raises(SourceError):
        texts_of(
            hub(files).batches(0), 0
        )  # (from the start, the corrupt file is read and fails clearly)

    for s in starts:
        assert texts_of(hub(files).batches(s), s) == expected[s]


@pytest.mark.parametrize("start", [0, 150, 240])
def test_non_parquet_datasets_still_stream(tmp_path, start):
    rng = np.random.default_rng(2)
    files = []
    for i, n in enumerate((140, 90)):
        files.append(str(tmp_path / f"part{i}.jsonl"))
        with open(files[-1], "w", encoding="utf-8") as f:
            for j in range(n):
                f.write(
                    json.dumps(
                        {
                            "text": f"{i}:{j} " + " ".join(rng.choice(WORDS, rng.integers(0, 30))),
                            "id": f"{i}-{j}",
                        }
                    )
                    + "\n"
                )
    src = HubSource("json", None, load_kwargs={"data_files": files})
    assert src._parquet_urls(src._builder()) is None
    got = texts_of(src.batches(start), start)
    assert got == streamed("json", files, start) and len(got) == max(0, 230 - start)


def test_parquet_options_that_change_the_rows_keep_the_streaming_path(hub_files):
    # FileSource would ignore a filter: such a source must stream (and so still yield the filtered rows)
    src = HubSource(
        "parquet", None, load_kwargs={"data_files": hub_files, "filters": [("int_score", ">=", 4)]}
    )
    assert src._parquet_urls(src._builder()) is None
    got = texts_of(src.batches(0), 0)
    assert 0 < len(got) < sum(SIZES)


def test_a_large_parquet_resume_batches_like_a_file_source(tmp_path):
    # more documents than one batch per row group: batches never exceed BATCH_DOCS, indices stay exact
    path = tmp_path / "big.parquet"
    docs = [f"doc {i}" for i in range(3 * BATCH_DOCS + 11)]
    write_fineweb_parquet(path, docs, seed=5)
    src = hub([str(path)])
    assert all(len(t) <= BATCH_DOCS for _, t in src.batches(0))
    assert texts_of(src.batches(BATCH_DOCS + 3), BATCH_DOCS + 3) == docs[BATCH_DOCS + 3 :]


def test_hf_urls_open_through_fsspec():
    # the URLs datasets resolves for the hub (pinned to a commit) are what FileSource opens with fsspec
    import fsspec
    from huggingface_hub import HfFileSystem

    url = "hf://datasets/HuggingFaceFW/fineweb-edu@" + "0" * 40 + "/sample/10BT/000_00000.parquet"
    fs, path = fsspec.core.url_to_fs(url)
    assert isinstance(fs, HfFileSystem) and path == url[len("hf://") :]


def test_unknown_dataset_is_a_clear_error_without_the_network(monkeypatch, tmp_path):
    import datasets.config
    import huggingface_hub.constants

    # offline mode, so the unreachable hub fails at once instead of after retries
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(SourceError) as err:
        next(HubSource("no-such-owner/no-such-dataset", "sample-10BT", "0" * 40).batches(0))
    msg = str(err.value)
    assert "no-such-owner/no-such-dataset" in msg and "\n" not in msg, msg
