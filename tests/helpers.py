"""Helpers the test modules share (fixtures are in conftest.py): data the tests make themselves, the fast
training overrides, and the commands tests run as a user would."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- training runs in seconds


def fast_run(
    max_steps: int,
    *,
    val_every: int,
    checkpoint_every: int,
    batch_tokens: int = 128,
    val_tokens: int = 64,
) -> list[str]:
    """Overrides of the tiny preset for ~30 ms steps on 2 CPU cores."""
    return [
        "micro_batch=2",
        "seq_len=32",
        f"total_batch_tokens={batch_tokens}",
        f"max_steps={max_steps}",
        "warmup_steps=2",
        f"val_every={val_every}",
        f"val_tokens={val_tokens}",
        "sample_every=0",
        f"checkpoint_every={checkpoint_every}",
        "log_every=1",
    ]


# the fast recipe's switches, all on (their presets choose among them by measurement)
FAST_RECIPE = [
    "optim.optimizer=muon",
    "optim.schedule=trapezoid",
    "model.pos_emb=rope",
    "model.qk_norm=true",
    "model.mlp_act=relu2",
    "model.tie_embeddings=false",
    "model.zero_init_proj=true",
    "model.logit_softcap=15",
    "data.align_docs=true",
]


# The training-job tests: gradient accumulation in play (256 tokens = 4 micro-steps), one checkpoint at the end.
TRAIN_BASE = fast_run(8, val_every=3, checkpoint_every=100, batch_tokens=256, val_tokens=128)
# The flow tests: a checkpoint (and so an evaluation) every few steps.
FLOW_FAST = fast_run(6, val_every=3, checkpoint_every=3)
DEPLOYMENT_FAST = fast_run(10, val_every=5, checkpoint_every=5)


def train_env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def train_cmd(data, run, *extra, nproc=1) -> list[str]:
    sets = [
        a
        for kv in TRAIN_BASE + [f"data_url={data}", f"run_dir={run}", *extra]
        for a in ("--set", kv)
    ]
    if nproc == 1:
        return [sys.executable, "-m", "training.train", "--config", "tiny", *sets]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "training.train",
        "--config",
        "tiny",
        *sets,
    ]


def run_train(data, run, *extra, nproc=1, expect=0) -> subprocess.CompletedProcess:
    p = subprocess.run(
        train_cmd(data, run, *extra, nproc=nproc),
        cwd=REPO,
        env=train_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    ok = p.returncode == expect if nproc == 1 else (p.returncode == 0) == (expect == 0)
    assert ok, f"exit {p.returncode} (wanted {expect}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def wait_for_steps(run, n: int, timeout=120) -> None:
    """Until the run's metrics.jsonl has `n` lines (a training process is that far)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        f = Path(run) / "metrics.jsonl"
        if f.exists() and len(f.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{run} did not reach {n} steps")


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def losses(run) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in metrics(run)]


def read_jsonl(path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


# ----------------------------------------------------------------------------- data the tests make


def make_shards(url, sizes, *, manifest=True, seed=0, values=None):
    """Token shards in the real format: sizes[0] is the val shard, the rest train shards.
    `values="positions"` fills each shard with its token positions (unique ids for coverage checks)."""
    from common.shards import write_manifest, write_shard

    rng = np.random.default_rng(seed)
    records = []
    for i, n in enumerate(sizes):
        toks = (
            np.arange(n, dtype=np.uint16)
            if values == "positions"
            else rng.integers(0, 50257, n, dtype=np.uint16)
        )
        records.append(write_shard(str(url), i, toks))
    if manifest:
        write_manifest(str(url), records)
    return records


PARQUET_SHARD = (
    5_000  # tokens per shard for the parquet corpus below: several shards and a remainder
)
WORDS = (
    "the of and to in is was for that on as with by he at from his an were are which this be or it "
    "education learning student teacher school science history water energy cells é naïve 東京 — "
    "“quoted” 3.14 2024 can't won't  \n\n"
).split(" ")
FINEWEB_FIELDS = (
    "text",
    "id",
    "dump",
    "url",
    "file_path",
    "language",
    "language_score",
    "token_count",
    "score",
    "int_score",
)


def corpus(n_docs=2500, seed=0, max_words=80) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = [" ".join(rng.choice(WORDS, rng.integers(0, max_words))) for _ in range(n_docs)]
    docs[5] = ""  # an empty document is still [<|endoftext|>]
    docs[7] = (
        "special-token text is ordinary text: <|endoftext|> <|fim_prefix|>"  # as in encode_ordinary
    )
    return docs


def write_parquet(path, docs, row_group_size=300) -> None:
    """FineWeb-Edu's schema."""
    n = len(docs)
    table = pa.table(
        {
            "text": docs,
            "id": [f"<urn:uuid:{i}>" for i in range(n)],
            "dump": ["CC-MAIN-2024-10"] * n,
            "url": [f"https://example.org/{i}" for i in range(n)],
            "file_path": ["s3://commoncrawl/x.warc.gz"] * n,
            "language": ["en"] * n,
            "language_score": [0.97] * n,
            "token_count": [len(d.split()) for d in docs],
            "score": [3.1] * n,
            "int_score": [3] * n,
        }
    )
    assert tuple(table.column_names) == FINEWEB_FIELDS
    pq.write_table(table, path, row_group_size=row_group_size)


def reference_shards(docs, shard_size, enc):
    """build-nanogpt's fineweb.py loop, single process: {name: npy bytes}."""
    out = {}

    def write(index, toks):
        buf = io.BytesIO()
        np.save(buf, toks)
        out[f"edufineweb_{'val' if index == 0 else 'train'}_{index:06d}.npy"] = buf.getvalue()

    shard_index, all_tokens_np, token_count = 0, np.empty((shard_size,), dtype=np.uint16), 0
    for doc in docs:
        tokens = np.array([enc._special_tokens["<|endoftext|>"]] + enc.encode_ordinary(doc)).astype(
            np.uint16
        )
        if token_count + len(tokens) < shard_size:
            all_tokens_np[token_count : token_count + len(tokens)] = tokens
            token_count += len(tokens)
        else:
            remainder = shard_size - token_count
            all_tokens_np[token_count : token_count + remainder] = tokens[:remainder]
            write(shard_index, all_tokens_np)
            shard_index += 1
            all_tokens_np[0 : len(tokens) - remainder] = tokens[remainder:]
            token_count = len(tokens) - remainder
    if token_count != 0:
        write(shard_index, all_tokens_np[:token_count])
    return out


def shard_files(url) -> dict[str, bytes]:
    from common import store

    return {
        n: store.read_bytes(store.join(url, n)) for n in store.listdir(url) if n.endswith(".npy")
    }


HELLASWAG_WORDS = (
    "the a river stone bright quickly walked under over green sleeps music window cold warm table "
    "slowly opened closed paper garden light dark morning evening laughed"
).split()


def make_examples(n, seed=0) -> list[dict]:
    """HellaSwag-format examples of random words (no hub here)."""
    rng = torch.Generator().manual_seed(seed)
    words = HELLASWAG_WORDS

    def pick(k):
        return " ".join(
            words[i] for i in torch.randint(0, len(words), (k,), generator=rng).tolist()
        )

    out = []
    for i in range(n):
        endings = [pick(int(torch.randint(2, 7, (1,), generator=rng))) + "." for _ in range(4)]
        out.append(
            {
                "ind": i,
                "ctx": pick(6).capitalize() + ".",
                "endings": endings,
                "label": int(torch.randint(0, 4, (1,), generator=rng)),
                "activity_label": "test",
            }
        )
    return out


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def small_hf_model(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4, seed=0):
    """A randomly initialised transformers GPT-2 (no hub access here), built locally from a GPT2Config."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(cfg).eval()
    # HF inits biases to zero and LayerNorms to 1/0; randomise them so a swapped or untransposed tensor shows.
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def free_port() -> int:
    """A TCP port nothing listens on now (for a server a test starts, or to point a client at nothing)."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ----------------------------------------------------------------------------- Slurm


def release_after_requeue(job_id: str, timeout=60) -> None:
    """A requeued job is held PENDING (Reason=BeginTime) ~120 s by Slurm; start it now instead, once the steps
    of its previous start are gone from the node (the hold exists for that: a restart while the old step is
    still being torn down can fail at once, with no output)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True
        ).stdout
        steps = subprocess.run(
            ["squeue", "-h", "-s", "-j", job_id], capture_output=True, text=True
        ).stdout
        if state.strip() == "PENDING" and not steps.strip():
            time.sleep(1)
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
            return
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} was not requeued")


def tiny_hellaswag_task(tmp_path, data) -> str:
    """An lm-eval task `tiny_hellaswag` over a HellaSwag-format jsonl (no hub): the folder of its YAML."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_hellaswag.yaml").write_text(f"""task: tiny_hellaswag
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{endings}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    return str(tasks)


def sacct_jobs(name, since: float) -> list[list[str]]:
    """[job id, state] of every Slurm job named `name` submitted since `since` (accounting's record)."""
    start = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(since - 1))
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "--name", name, "-o", "JobID,State", "-S", start],
        capture_output=True,
        text=True,
    ).stdout
    return [ln.split("|") for ln in out.splitlines() if ln.strip()]
