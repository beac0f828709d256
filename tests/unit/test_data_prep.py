"""data_prep in this process: FineWeb-Edu-schema parquet/jsonl and the hub's code path -> shards byte-identical
to build-nanogpt's, whatever the number of workers; resumable after a crash; sources and worker errors. The
CLI, kills and S3: tests/e2e/test_data_prep.py."""

import hashlib
import json
import os

import pytest
from helpers import PARQUET_SHARD as SHARD
from helpers import shard_files, write_parquet

from common import store
from common.errors import ReproError
from common.shards import list_shards, load_shard
from data_prep import pipeline
from data_prep.sources import HubSource, SourceError, open_source
from data_prep.verify import verify


@pytest.mark.parametrize("workers", [1, 2])
def test_byte_identical_to_build_nanogpt_whatever_the_workers(
    parquet_dir, reference, docs, tmp_path, workers
):
    out = str(tmp_path / "shards")
    manifest = pipeline.build(out, open_source(str(parquet_dir)), SHARD, workers, progress=False)
    names = sorted(reference, key=lambda n: n[-10:])
    assert len(names) > 5 and len(reference[names[-1]]) < len(
        reference[names[0]]
    )  # a remainder shard
    assert shard_files(out) == reference
    assert [s["name"] for s in manifest["shards"]] == names
    assert manifest["shards"][0]["name"] == "edufineweb_val_000000.npy"
    assert all(
        s["sha256"] == hashlib.sha256(reference[s["name"]]).hexdigest() for s in manifest["shards"]
    )
    assert manifest["documents"] == len(docs) and manifest["tokenizer"] == "gpt2"
    assert manifest["source"]["kind"] == "files" and len(manifest["source"]["files"]) == 3
    assert verify(out) == ([], [])
    assert load_shard(list_shards(out, "val")[0]).size == SHARD


def test_jsonl_and_hub_code_path_match_parquet(parquet_dir, docs, reference, tmp_path):
    jl = tmp_path / "docs.jsonl"
    jl.write_text("".join(json.dumps({"text": d, "id": str(i)}) + "\n" for i, d in enumerate(docs)))
    pipeline.build(str(tmp_path / "jsonl"), open_source(str(jl)), SHARD, 2, progress=False)
    assert shard_files(str(tmp_path / "jsonl")) == reference
    # the same load_dataset(..., split="train", streaming=True) call as for HuggingFaceFW/fineweb-edu
    files = sorted(str(p) for p in parquet_dir.glob("*.parquet"))
    hub = HubSource("parquet", None, load_kwargs={"data_files": files})
    pipeline.build(str(tmp_path / "hub"), hub, SHARD, 2, progress=False)
    assert shard_files(str(tmp_path / "hub")) == reference


def test_a_folder_of_text_files_is_one_document_per_file_and_matches_parquet(
    parquet_dir, docs, reference, tmp_path
):
    """A documentation tree (.txt, .md, .rst) as a source: file by file in name order, each one document, the
    shards the same as the same documents from parquet; resumable mid-way like every source."""
    tree = tmp_path / "docs"
    tree.mkdir()
    suffixes = (".txt", ".md", ".rst")
    for i, d in enumerate(docs):
        (tree / f"{i:06d}{suffixes[i % 3]}").write_text(d)
    pipeline.build(str(tmp_path / "text"), open_source(str(tree)), SHARD, 2, progress=False)
    assert shard_files(str(tmp_path / "text")) == reference
    (tree / "zz.txt").write_bytes(b"caf\xe9")
    with pytest.raises(SourceError, match="zz.txt: not UTF-8 text"):
        pipeline.build(str(tmp_path / "bad"), open_source(str(tree)), SHARD, 1, progress=False)


def test_hub_spec_parsing():
    s = open_source(None)
    assert (s.dataset, s.config, s.revision) == ("HuggingFaceFW/fineweb-edu", "sample-10BT", None)
    s = open_source("sample-350BT")
    assert s.config == "sample-350BT"
    s = open_source("hf:HuggingFaceFW/fineweb-edu:sample-100BT@v1.2.0")
    assert (s.config, s.revision) == ("sample-100BT", "v1.2.0")


def test_crash_after_some_shards_then_resume_is_byte_identical(parquet_dir, reference, tmp_path):
    full = str(tmp_path / "full")
    pipeline.build(full, open_source(str(parquet_dir)), SHARD, 2, progress=False)
    out = str(tmp_path / "crashed")
    r = pipeline.build(out, open_source(str(parquet_dir)), SHARD, 2, progress=False, max_shards=7)
    assert r["complete"] is False and not store.exists(store.join(out, "manifest.json"))
    # what a kill leaves behind: a stray temp file, a shard without its sidecar, a truncated one
    (tmp_path / "crashed" / ".edufineweb_train_000007.npy.1234.tmp").write_bytes(b"partial")
    (tmp_path / "crashed" / ".prep" / "edufineweb_train_000006.npy.json").unlink()
    (tmp_path / "crashed" / "edufineweb_train_000006.npy").write_bytes(b"truncated")
    manifest = pipeline.build(out, open_source(str(parquet_dir)), SHARD, 1, progress=False)
    assert shard_files(out) == reference
    assert store.read_bytes(store.join(out, "manifest.json")) == store.read_bytes(
        store.join(full, "manifest.json")
    )
    assert verify(out)[0] == []
    before = os.stat(tmp_path / "crashed" / "manifest.json").st_mtime_ns
    assert pipeline.build(out, open_source(str(parquet_dir)), SHARD, 2, progress=False) == manifest
    assert (
        os.stat(tmp_path / "crashed" / "manifest.json").st_mtime_ns == before
    )  # a complete store is left alone


@pytest.mark.parametrize("start", [0, 1, 299, 300, 301, 699, 700, 701, 1500, 2499])
def test_parquet_resume_point_yields_exactly_the_remaining_documents(parquet_dir, docs, start):
    # 300-row groups in files of 700, 1200 and 600 documents: starts on and around group and file boundaries
    got, index = [], start
    for first, texts in open_source(str(parquet_dir)).batches(start):
        assert first == index
        texts = texts.to_pylist() if hasattr(texts, "to_pylist") else texts
        got += texts
        index += len(texts)
    assert got == docs[start:]


def test_a_hub_source_already_pinned_to_a_commit_is_not_resolved_again():
    # (resolving main needs the hub, unreachable here: test_unreachable_hub_is_a_clear_error runs that code)
    pinned = HubSource("HuggingFaceFW/fineweb-edu", "sample-10BT", "a" * 40)
    assert pinned.resolved() is pinned
    local = HubSource("parquet", None, load_kwargs={"data_files": ["x.parquet"]})
    assert local.resolved() is local


def test_parquet_row_groups_go_to_workers_as_small_records_with_the_same_documents(
    docs, tmp_path, monkeypatch
):
    """The coordinating process ships (file, row group, rows) records, not texts, so it does not saturate on
    a many-core node; a row group too large to be one unit is still read here in batches."""
    import pickle

    from data_prep import sources

    monkeypatch.setattr(sources, "LAZY_ROW_GROUP_DOCS", 400)
    write_parquet(tmp_path / "a.parquet", docs[:900], row_group_size=300)  # records
    write_parquet(
        tmp_path / "b.parquet", docs[900:2000], row_group_size=1000
    )  # 1000 > 400: batches, then 100
    src = open_source(str(tmp_path))
    for start in (0, 250, 1450, 2000):
        units = list(src.units(start))
        texts = [t for _, u in units for t in (u.read() if hasattr(u, "read") else u).to_pylist()]
        assert texts == docs[start:2000]
        firsts = [first for first, _ in units]
        assert firsts == sorted(firsts) and (not units or firsts[0] == start)
    records = [u for _, u in src.units(0) if isinstance(u, sources.ParquetRows)]
    assert len(records) == 4 and all(len(pickle.dumps(r)) < 300 for r in records)
    resumed = [u for _, u in src.units(250) if isinstance(u, sources.ParquetRows)]
    assert [(r.url[-9:], r.row_group, r.offset, len(r)) for r in resumed] == [
        ("a.parquet", 0, 250, 50),
        ("a.parquet", 1, 0, 300),
        ("a.parquet", 2, 0, 300),
        ("b.parquet", 1, 0, 100),
    ]


class _DiesWhenRead:
    """A unit whose reading kills its worker process, as the kernel's OOM killer would."""

    def __len__(self):
        return 1

    def read(self):
        os._exit(9)


def test_worker_failures_reach_the_coordinator_with_their_message(tmp_path, docs):
    from data_prep.tokenize import tokenize_units

    # a row group whose data is garbage: the worker that reads it reports it, the run stops with its message
    write_parquet(tmp_path / "a.parquet", docs[:600], row_group_size=300)
    data = bytearray((tmp_path / "a.parquet").read_bytes())
    data[8 : len(data) // 2] = os.urandom(
        len(data) // 2 - 8
    )  # row groups 0 and 1 (of 2); footer intact
    (tmp_path / "a.parquet").write_bytes(bytes(data))
    with pytest.raises(SourceError, match=r"a\.parquet: reading row group [01]: OSError"):
        list(tokenize_units(open_source(str(tmp_path / "a.parquet")).units(), 2))
    # a worker that dies: a clear error, not a hang
    units = [(0, ["fine text"] * 10), (10, _DiesWhenRead()), (11, ["more"] * 5)]
    with pytest.raises(ReproError, match="tokenizer worker died"):
        list(tokenize_units(units, 2))
    # the consumer stopping early leaves no worker behind
    gen = tokenize_units(((i, ["a b c"] * 50) for i in range(0, 5000, 50)), 2)
    next(gen)
    gen.close()
    import multiprocessing

    assert multiprocessing.active_children() == []
