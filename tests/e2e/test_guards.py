"""Bad input is one line and exit 2 from every CLI, before anything is written; no output lands on files the
command did not write. Real subprocesses, as a user runs them; S3 cases against moto's server."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, make_examples, make_shards, run_train, write_jsonl, write_parquet

from common import store
from common.errors import BadInput
from common.exit_codes import BAD_INPUT


def cli(module, *args, env=None, timeout=300):
    p = subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, **(env or {})),
    )
    return p


def one_line_error(p, *fragments):
    """Exit 2, no traceback, and the message naming what is wrong."""
    assert p.returncode == BAD_INPUT, (
        f"exit {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    )
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    for f in fragments:
        assert f in p.stderr, f"{f!r} not in:\n{p.stderr[-3000:]}"


@pytest.fixture(scope="module")
def run_dir(demo_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("guarded") / "run"
    run_train(demo_data, run, "checkpoint_every=4")
    return run


def test_export_never_writes_over_a_run_directory_or_a_file(run_dir, tmp_path):
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    one_line_error(
        cli("training.export_hf", "--checkpoint", run_dir, "--out", run_dir),
        "holds files that are not a Hugging Face export's",
        "--force",
    )
    assert {
        p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()
    } == before  # not one byte changed
    (tmp_path / "file").write_text("x")
    one_line_error(
        cli("training.export_hf", "--checkpoint", run_dir, "--out", tmp_path / "file"), "is a file"
    )
    out = tmp_path / "export"
    assert cli("training.export_hf", "--checkpoint", run_dir, "--out", out).returncode == 0
    assert (
        cli("training.export_hf", "--checkpoint", run_dir, "--out", out).returncode == 0
    )  # its own: again
    (out / "notes.txt").write_text("mine")
    one_line_error(cli("training.export_hf", "--checkpoint", run_dir, "--out", out), "notes.txt")
    assert (
        cli("training.export_hf", "--checkpoint", run_dir, "--out", out, "--force").returncode == 0
    )
    assert (out / "notes.txt").read_text() == "mine"


def test_training_never_writes_into_a_folder_of_someone_elses_files(demo_data, tmp_path):
    """A run directory is new, empty, or a run directory; a folder of other files needs --force."""
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    sets = [
        a
        for kv in [f"data_url={demo_data}", f"run_dir={mine}", "max_steps=2"]
        for a in ("--set", kv)
    ]
    p = cli("training.train", "--config", "tiny", *sets)
    one_line_error(p, "holds files that are not a run directory's (thesis.tex)", "--force")
    assert sorted(x.name for x in mine.iterdir()) == ["thesis.tex"]  # not one file added
    assert cli("training.train", "--config", "tiny", *sets, "--force").returncode == 0
    assert (mine / "thesis.tex").read_text() == "years of work" and (
        mine / "metrics.jsonl"
    ).exists()


def test_data_prep_never_writes_over_shards_it_did_not_write(tmp_path, docs):
    src = tmp_path / "src.parquet"
    write_parquet(src, docs[:300])
    theirs = tmp_path / "theirs"
    make_shards(
        theirs, [5000, 5000, 5000], manifest=False
    )  # build-nanogpt's folder: no manifest, no state
    before = {p.name: p.read_bytes() for p in theirs.iterdir()}
    one_line_error(
        cli(
            "data_prep.fineweb",
            "--source",
            src,
            "--out",
            theirs,
            "--shard-tokens",
            2000,
            "--no-progress",
        ),
        "holds files that are not data prep's",
        "edufineweb_train_000001.npy",
    )
    assert {p.name: p.read_bytes() for p in theirs.iterdir()} == before
    p = cli(
        "data_prep.fineweb",
        "--source",
        src,
        "--out",
        theirs,
        "--shard-tokens",
        2000,
        "--no-progress",
        "--force",
    )
    assert p.returncode == 0, p.stderr[-2000:]
    (tmp_path / "afile").write_text("x")
    one_line_error(
        cli("data_prep.fineweb", "--source", src, "--out", tmp_path / "afile", "--no-progress"),
        str(tmp_path / "afile"),
    )


def test_data_prep_on_s3_never_writes_over_foreign_shards(s3_env, tmp_path, docs):
    from data_prep import pipeline
    from data_prep.sources import open_source

    bucket = s3_env["make_bucket"]("guarded-prep")
    make_shards(f"{bucket}/theirs", [3000, 3000], manifest=False)
    src = tmp_path / "src.jsonl"
    write_jsonl(src, [{"text": d} for d in docs[:200]])
    with pytest.raises(BadInput, match="not data prep's"):
        pipeline.build(f"{bucket}/theirs", open_source(str(src)), 2000, 1, progress=False)
    assert store.read_bytes(f"{bucket}/theirs/edufineweb_train_000001.npy")[:6] == b"\x93NUMPY"
    assert not store.exists(f"{bucket}/theirs/manifest.json")


def test_staging_another_hellaswag_file_over_the_one_in_the_store_needs_force(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", make_examples(3))
    b = write_jsonl(tmp_path / "b.jsonl", make_examples(3, seed=9))
    assert (
        cli("evaluation.hellaswag_data", "--out", tmp_path / "store", "--source", a).returncode == 0
    )
    one_line_error(
        cli("evaluation.hellaswag_data", "--out", tmp_path / "store", "--source", b),
        "holds another HellaSwag file",
        "--force",
    )
    staged = tmp_path / "store" / "data" / "hellaswag" / "hellaswag_val.jsonl"
    assert staged.read_text() == Path(a).read_text()
    assert (
        cli(
            "evaluation.hellaswag_data", "--out", tmp_path / "store", "--source", b, "--force"
        ).returncode
        == 0
    )
    assert staged.read_text() == Path(b).read_text()
    bad = write_jsonl(tmp_path / "c.jsonl", [{**make_examples(1)[0], "label": 2.7}])
    one_line_error(
        cli("evaluation.hellaswag_data", "--out", tmp_path / "s2", "--source", bad), "line 1"
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, docs):
    disk = tmp_path / "disk"
    disk.mkdir()
    if (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)]).returncode
        != 0
    ):
        pytest.skip("this machine cannot mount a tmpfs")
    try:
        src = tmp_path / "src.parquet"
        write_parquet(src, docs)  # ~100k tokens: 200 kB of shards, on a 64 kB disk
        p = cli(
            "data_prep.fineweb",
            "--source",
            src,
            "--out",
            disk / "shards",
            "--shard-tokens",
            10_000,
            "--no-progress",
            "--workers",
            1,
        )
        one_line_error(p, "cannot write", "No space left on device")
        assert not [f for f in disk.rglob("*") if f.name.endswith(".tmp")]
    finally:
        subprocess.run(["umount", str(disk)])


def test_cli_inputs_out_of_range_are_one_line(run_dir, tmp_path):
    data = write_jsonl(tmp_path / "hs.jsonl", make_examples(4))
    for limit in ("0", "-3"):
        one_line_error(
            cli(
                "evaluation.evaluate",
                "--checkpoint",
                run_dir,
                "--hellaswag-data",
                data,
                "--limit",
                limit,
            ),
            "--limit",
            "positive integer",
        )
    one_line_error(
        cli("training.sample", "--checkpoint", run_dir, "--prompt", ""), "--prompt is empty"
    )
    for t in ("-1", "nan"):
        one_line_error(
            cli("training.sample", "--checkpoint", run_dir, "--temperature", t), "--temperature"
        )
    one_line_error(
        cli("training.sample", "--checkpoint", run_dir, "--device", "cuda"),
        "no CUDA device is visible",
    )
    one_line_error(
        cli("evaluation.evaluate", "--checkpoint", run_dir, "--device", "cuda"),
        "no CUDA device is visible",
    )
    one_line_error(
        cli("training.sample", "--checkpoint", run_dir, "--device", "tpu9"), "is not a device"
    )


def test_config_and_source_mistakes_are_one_line(tmp_path):
    (tmp_path / "presets").mkdir()
    one_line_error(cli("training.train", "--config", tmp_path / "presets"), "is a directory")
    jl = tmp_path / "bad.jsonl"
    jl.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')  # latin-1, not UTF-8, on line 2
    one_line_error(
        cli("data_prep.fineweb", "--source", jl, "--out", tmp_path / "o", "--no-progress"),
        f"{jl} line 2: not UTF-8",
    )
    one_line_error(
        cli("data_prep.fineweb", "--source", jl, "--out", tmp_path / "o", "--shard-tokens", "0"),
        "--shard-tokens",
        "positive integer",
    )
    assert not list(tmp_path.rglob("*.npy"))


def test_token_ids_past_the_vocabulary_are_bad_data_not_a_divergence(tmp_path):
    """A training run on shards holding ids of the padded rows (50257..50303): one line naming the shard and
    the offset, exit 2, instead of a non-finite loss the guard would take for divergence."""
    data = tmp_path / "data"
    make_shards(data, [5000, 5000])
    shard = data / "edufineweb_train_000001.npy"
    raw = bytearray(shard.read_bytes())
    raw[-2:] = (50290).to_bytes(2, "little")  # the last token: a padded row's id
    shard.write_bytes(bytes(raw))
    run = tmp_path / "run"
    sets = [f"data_url={data}", f"run_dir={run}", "verify_checksums=false"]
    p = cli("training.train", "--config", "tiny", *[a for kv in sets for a in ("--set", kv)])
    one_line_error(p, "edufineweb_train_000001.npy holds token id 50290 at offset 4999")


def test_a_store_that_never_answers_is_one_line_within_its_deadline(tmp_path):
    """An endpoint that accepts connections and never answers (a hung proxy, a wedged gateway): every call to
    the store has a deadline (common/store.py S3_DEADLINES; shortened here through fsspec's own setting, as a
    user would), past which the command says what did not answer, instead of waiting without end."""
    import socket
    import threading

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)
    held = []
    threading.Thread(
        target=lambda: [held.append(hole.accept()) for _ in range(64)], daemon=True
    ).start()
    endpoint = f"http://127.0.0.1:{hole.getsockname()[1]}"
    env = {
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "y",
        "AWS_EC2_METADATA_DISABLED": "true",
        "FSSPEC_S3": json.dumps(
            {"endpoint_url": endpoint, "config_kwargs": {"read_timeout": 2, "connect_timeout": 2}}
        ),
    }
    for args in (
        ["evaluation.evaluate", "--checkpoint", "s3://bucket/runs/r", "--hellaswag-data", "x"],
        ["training.train", "--config", "tiny", "--set", "data_url=s3://bucket/data"],
    ):
        t0 = time.monotonic()
        p = cli(*args, env=env, timeout=120)
        assert time.monotonic() - t0 < 90
        one_line_error(p, "Read timeout on endpoint URL", endpoint)
    hole.close()


def test_missing_storage_credentials_are_one_line_in_every_reader(s3_server, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        FSSPEC_S3_ENDPOINT_URL=s3_server["endpoint_url"],
        AWS_CONFIG_FILE="/nonexistent",
        AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
        AWS_EC2_METADATA_DISABLED="true",
    )
    for module in ("evaluation.evaluate", "training.sample", "training.export_hf"):
        extra = ["--out", str(tmp_path / "x")] if module == "training.export_hf" else []
        p = subprocess.run(
            [sys.executable, "-m", module, "--checkpoint", "s3://bucket/runs/r", *extra],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        one_line_error(p, "s3://bucket/runs/r", "credentials")


def test_slurm_and_flow_inputs_are_one_line(tmp_path):
    no_slurm = {
        "PATH": str(Path(sys.executable).parent)
    }  # this venv's commands only: no sbatch, no sinfo
    one_line_error(
        cli("cluster.submit", "--config", "tiny", "--folder", tmp_path / "slurm", env=no_slurm),
        "no Slurm client on this machine",
    )
    assert not (tmp_path / "slurm").exists()
    (tmp_path / "spec.json").write_text('{"nodes": 2,')
    one_line_error(
        cli("cluster.submit", "--config", "tiny", "--spec", tmp_path / "spec.json"),
        "--spec is not valid JSON",
    )
    one_line_error(
        cli("cluster.submit", "--reattach", "424242", "--folder", tmp_path / "slurm"),
        "no job 424242",
    )
    one_line_error(
        cli(
            "cluster.prep_array",
            "--source",
            tmp_path,
            "--out",
            tmp_path / "o",
            "--cpus-per-task",
            "-1",
        ),
        "cpus_per_task",
    )
    one_line_error(
        cli(
            "flows.pretrain",
            "--params",
            json.dumps({"backoff_seconds": "inf"}),
            env={"PREFECT_API_URL": ""},
        ),
        "backoff_seconds",
    )
    one_line_error(
        cli("flows.pretrain", "--run-name", "a/b", env={"PREFECT_API_URL": ""}), "run_name"
    )
    p = cli(
        "flows.pretrain", "--store", "sftp://alice:s3cr3t@host/gpt2", env={"PREFECT_API_URL": ""}
    )
    one_line_error(p, "store carries a password in its URL")
    assert "s3cr3t" not in p.stderr + p.stdout
