"""The run's growing files (common/logfiles.py): appended at once on a local disk; on an object store (fsspec's
in-memory filesystem here, moto's S3 server in test_train_s3.py) rewritten by one thread, complete at flush()."""

import threading
import time
import uuid

from common import store
from common.logfiles import LogFiles


def _text(url):
    return store.read_bytes(url).decode()


def test_a_local_file_gets_each_line_at_once_and_keeps_only_the_lines_asked_for(tmp_path):
    url = str(tmp_path / "run" / "a.jsonl")
    store.write_bytes(url, b"1\n2\n3\n4")  # the last line torn by a killed writer
    f = LogFiles().open(url, keep=lambda line: line in ("1", "2"))
    assert _text(url) == "1\n2\n"  # rewritten at once, without the lines dropped
    f.append("5\n")
    assert _text(url) == "1\n2\n5\n"  # no flush needed
    g = LogFiles().open(str(tmp_path / "run" / "b.jsonl"))
    assert not store.exists(str(tmp_path / "run" / "b.jsonl"))  # nothing to keep, nothing created
    g.append("x\n")
    assert _text(str(tmp_path / "run" / "b.jsonl")) == "x\n"


def test_object_store_files_are_written_by_one_thread_and_complete_after_a_flush():
    root = f"memory://logfiles-{uuid.uuid4().hex}"
    store.write_bytes(f"{root}/old.jsonl", b"kept\n")
    files = LogFiles(flush_seconds=3600.0)
    threads = threading.active_count()
    a = files.open(f"{root}/a.jsonl", create=True)
    old = files.open(f"{root}/old.jsonl")
    assert threading.active_count() == threads + 1  # one writer for every file
    assert _text(f"{root}/a.jsonl") == ""
    for i in range(3):
        a.append(f"{i}\n")
    old.append("new\n")
    assert (
        _text(f"{root}/a.jsonl") == "" and _text(f"{root}/old.jsonl") == "kept\n"
    )  # not within the hour
    files.flush()
    assert _text(f"{root}/a.jsonl") == "0\n1\n2\n" and _text(f"{root}/old.jsonl") == "kept\nnew\n"


def test_the_writer_thread_rewrites_on_its_own_once_the_interval_has_passed():
    root = f"memory://logfiles-{uuid.uuid4().hex}"
    files = LogFiles(flush_seconds=0.0)
    f = files.open(f"{root}/m.jsonl")
    f.append("a\n")
    deadline = time.time() + 10
    while (
        not (store.exists(f"{root}/m.jsonl") and _text(f"{root}/m.jsonl") == "a\n")
        and time.time() < deadline
    ):
        time.sleep(0.01)
    assert _text(f"{root}/m.jsonl") == "a\n"
