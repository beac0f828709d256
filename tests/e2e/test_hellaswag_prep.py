"""evaluation.hellaswag_data: stages a HellaSwag val jsonl into {store}/data/hellaswag/, validated, idempotent,
readable by the evaluation; also on S3 (moto's server)."""

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO

from common import store
from evaluation import hellaswag_data as prep

EXAMPLES = [
    {
        "ind": 24,
        "ctx": "A man is sitting on a roof. he",
        "activity_label": "Roof shingle removal",
        "ctx_a": "A man is sitting on a roof.",
        "ctx_b": "he",
        "split": "val",
        "split_type": "indomain",
        "label": 3,
        "endings": [
            "is using wrap to wrap a pair of skis.",
            "is ripping level tiles off.",
            "is holding a rubik's cube.",
            "starts pulling up roofing on a roof.",
        ],
        "source_id": "activitynet~v_-JhWjGDPHMY",
    },
    {
        "ind": 92,
        "ctx": "A woman is outside with a bucket and a dog.",
        "label": 0,
        "split": "val",
        "endings": [
            "The dog is running around.",
            "She rinses the bucket.",
            "The dog drinks.",
            "She sings.",
        ],
    },
    {
        "ind": 106,
        "ctx": "Kids are playing in a yard.",
        "label": 2,
        "split": "val",
        "endings": ["They fly.", "They cook dinner.", "They run after a ball.", "They read."],
    },
]


@pytest.fixture
def source(tmp_path):
    p = tmp_path / "hellaswag_val.jsonl"
    p.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    return p


def run(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "evaluation.hellaswag_data", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, **(env or {})),
    )


def test_stage_local_store_then_rerun(source, tmp_path):
    r = run("--out", str(tmp_path / "store"), "--source", str(source))
    assert r.returncode == 0 and "3 examples" in r.stdout and "written" in r.stdout, r.stderr
    dst = tmp_path / "store" / "data" / "hellaswag" / "hellaswag_val.jsonl"
    assert dst.read_bytes() == source.read_bytes()
    assert [e["label"] for e in prep.read_examples(str(dst))] == [
        3,
        0,
        2,
    ]  # what the evaluation reads
    r = run("--out", str(tmp_path / "store"), "--source", str(source))
    assert r.returncode == 0 and "already there" in r.stdout


@pytest.mark.parametrize(
    "bad,line",
    [
        ('{"ctx": "x", "endings": ["a", "b", "c"], "label": 0}', 2),  # 3 endings
        ('{"ctx": "x", "endings": ["a", "b", "c", "d"], "label": 4}', 2),  # label out of range
        ("not json", 2),
        ('{"ctx": " ", "endings": ["a", "b", "c", "d"], "label": 0}', 2),  # no context: no question
        ('{"ctx": "x", "endings": ["a", "", "c", "d"], "label": 1}', 2),  # an empty ending
    ],
)
def test_bad_format_is_rejected_before_writing(source, tmp_path, bad, line):
    source.write_text(json.dumps(EXAMPLES[0]) + "\n" + bad + "\n")
    r = run("--out", str(tmp_path / "store"), "--source", str(source))
    assert (
        r.returncode == 2 and f"line {line}" in r.stderr and "not a HellaSwag example" in r.stderr
    )
    assert not (tmp_path / "store" / "data" / "hellaswag").exists()


def test_missing_source_and_empty_file(tmp_path):
    r = run("--out", str(tmp_path / "store"), "--source", str(tmp_path / "nope.jsonl"))
    assert r.returncode == 2 and "no such file" in r.stderr
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(prep.HellaSwagDataError, match="no examples"):
        prep.stage(str(tmp_path / "store"), str(tmp_path / "empty.jsonl"))


def test_stage_to_s3(s3_env, source):
    bucket = s3_env["make_bucket"]("hellaswag-store")
    r = prep.stage(bucket, str(source))
    assert (
        r["url"] == f"{bucket}/data/hellaswag/hellaswag_val.jsonl"
        and r["examples"] == 3
        and r["written"]
    )
    assert store.read_bytes(r["url"]) == source.read_bytes()
    assert prep.stage(bucket, str(source))["written"] is False
