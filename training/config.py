"""The one typed run config: model, data, optimisation, training, checkpointing, evaluation.

Presets live in `configs/*.toml`; `--set key=value` overrides take either a dotted path
(`optim.max_lr=3e-4`) or a bare field name when it is unique across sections (`max_lr=3e-4`).
Everything is validated here, before a GPU is allocated or a Slurm job is queued.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any, Literal, NamedTuple

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.cli import validation_message
from common.errors import BadInput
from common.layout import LOCAL_STORE, StoreLayout
from common.secrets import has_password
from common.tokenizer import VOCAB_SIZE

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(BadInput, ValueError):
    """A config that cannot run; the message names the offending field."""


class _Section(BaseModel):
    # extra="forbid" turns a typo into an error instead of a silently ignored key; inf and nan are no numbers
    # a run can use (max_lr=inf trains into NaN).
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False
    )


class GPTConfig(_Section):
    """Shape of the GPT-2 network (defaults: GPT-2 124M)."""

    block_size: int = Field(1024, gt=0, description="maximum context length (learned positions)")
    vocab_size: int = Field(VOCAB_SIZE, gt=0, description="tokens the tokenizer can emit")
    n_layer: int = Field(12, gt=0)
    n_head: int = Field(12, gt=0)
    n_embd: int = Field(768, gt=0)
    pad_vocab_to: int = Field(
        64,
        gt=0,
        le=4096,  # a multiple for the matmul's shape, not a size: past this it only wastes memory
        description="round the embedding/logit rows up to a multiple of this (50257 -> 50304); 1 = off",
    )
    # The fast recipe's switches; each default is GPT-2's.
    pos_emb: Literal["learned", "rope"] = Field(
        "learned", description="learned position embeddings (GPT-2), or rotary ones on q and k"
    )
    qk_norm: bool = Field(False, description="RMS-normalise each head's q and k before attention")
    mlp_act: Literal["gelu", "relu2"] = Field(
        "gelu", description="the MLP's activation: tanh GELU (GPT-2), or ReLU squared"
    )
    tie_embeddings: bool = Field(
        True, description="the head shares its tensor with the token embedding (GPT-2)"
    )
    zero_init_proj: bool = Field(
        False, description="output projections into the residual stream start at zero"
    )
    logit_softcap: float = Field(
        0.0, ge=0, description="logits squashed to (-cap, cap) by cap*tanh(x/cap); 0 = off"
    )
    value_embeds: int = Field(
        0,
        ge=0,
        description="token-embedding tables mixed into the attention's values (v = a*v + b*table[token], a "
        "and b learned per layer): table k serves layer k and layer n_layer - value_embeds + k; 0 = off",
    )
    unet_skips: bool = Field(
        False,
        description="U-net skips: the output of each of the first n_layer/2 blocks is added, with a learned "
        "weight, to the input of its mirror in the last n_layer/2 (the last block takes the first's)",
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> GPTConfig:
        if self.n_embd % self.n_head:
            raise ValueError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})"
            )
        head = self.n_embd // self.n_head
        if self.pos_emb == "rope" and head % 2:
            raise ValueError(
                f"model.pos_emb=rope rotates pairs of a head's dimensions, and the head size "
                f"(n_embd / n_head = {head}) is odd"
            )
        if 2 * self.value_embeds > self.n_layer:
            raise ValueError(
                f"model.value_embeds={self.value_embeds} tables serve the first and the last "
                f"{self.value_embeds} layers, and the model has {self.n_layer}: at most {self.n_layer // 2}"
            )
        if self.unet_skips and self.n_layer < 2:
            raise ValueError(
                "model.unet_skips joins the first half of the blocks to the second: it needs 2 layers"
            )
        return self

    def value_table(self, layer: int) -> int | None:
        """Which value-embedding table `layer` mixes into its values (model.value_embeds), or None."""
        n, first_late = self.value_embeds, self.n_layer - self.value_embeds
        if layer < n:
            return layer
        return layer - first_late if n and layer >= first_late else None

    @property
    def unet_pairs(self) -> int:
        """How many blocks pass their output on to a mirror (model.unet_skips): the first n_layer // 2."""
        return self.n_layer // 2 if self.unet_skips else 0

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_to
        return (self.vocab_size + m - 1) // m * m

    def not_gpt2(self) -> list[str]:
        """The switches that make this model other than GPT-2's architecture (a Hugging Face GPT-2 cannot hold
        it); empty when it is GPT-2-shaped."""
        default = GPTConfig()
        # zero_init_proj is not among them: it changes where training starts, not the shape
        fields = (
            "pos_emb",
            "qk_norm",
            "mlp_act",
            "tie_embeddings",
            "logit_softcap",
            "value_embeds",
            "unet_skips",
        )
        return [
            f"model.{f}={getattr(self, f)}"
            for f in fields
            if getattr(self, f) != getattr(default, f)
        ]


class Span(NamedTuple):
    """A "start:stop" range of steps or data batches, stop excluded (its text form is the config's)."""

    start: int
    stop: int

    def __str__(self) -> str:
        return f"{self.start}:{self.stop}"

    def holds(self, n: int) -> bool:
        return self.start <= n < self.stop


def parse_range(text: str) -> Span:
    """A "start:stop" range (stop excluded)."""
    start, stop = (int(x) for x in text.split(":"))
    return Span(start, stop)


def _check_ranges(entries: list[str], field: str) -> None:
    for r in entries:
        if not re.fullmatch(r"\d+:\d+", r) or parse_range(r)[0] >= parse_range(r)[1]:
            raise ValueError(f"{field} entry {r!r} is not a 'start:stop' range with start < stop")


class DataConfig(_Section):
    dataset: str = Field(
        "fineweb-edu/sample-10BT", description="the shards' name in a store: {store}/data/{dataset}"
    )
    data_url: str | None = Field(
        None,
        description="fsspec URL of the token shards; default: the dataset in the "
        "local store, ./store/data/{dataset} (a flow uses its own store)",
    )
    source: str | None = Field(
        None,
        description="what a flow makes the shards from when they are missing: a "
        "data_prep source (hf:HuggingFaceFW/fineweb-edu:sample-10BT, parquet/jsonl files, demo)",
    )
    shuffle: bool = Field(
        False, description="seeded per-epoch shuffling (off = build-nanogpt's exact order)"
    )
    align_docs: bool = Field(
        False,
        description="every training row starts at a document's first token (the fast recipe's); the rest "
        "of a document longer than a row is passed over, so it suits documents about as long as a row or "
        "shorter; off = rows cut from the token stream wherever they fall (build-nanogpt)",
    )
    resume_on_other_data: bool = Field(
        False,
        description="resume a checkpoint although data_url now holds other "
        "shards than it was trained on (the token stream changes)",
    )
    skip_batches: list[str] = Field(
        default_factory=list,
        description="'start:stop' ranges of step batches of the "
        "token stream that training passes over (a rollback past data that diverged)",
    )

    @model_validator(mode="after")
    def _ranges(self) -> DataConfig:
        _check_ranges(self.skip_batches, "data.skip_batches")
        if self.align_docs and self.shuffle:
            raise ValueError(
                "data.align_docs reads documents in order: it does not combine with data.shuffle"
            )
        return self

    verify_checksums: bool = Field(
        True, description="check shard sha256 against the manifest when one exists"
    )

    @property
    def url(self) -> str:
        """data_url as RunConfig resolves it (the dataset in the local store when not given)."""
        if self.data_url is None:
            return StoreLayout(LOCAL_STORE).dataset(self.dataset)
        return self.data_url


class OptimConfig(_Section):
    """build-nanogpt's AdamW and cosine schedule by default; Muon and the trapezoid are the fast recipe's."""

    optimizer: Literal["adamw", "muon"] = Field(
        "adamw",
        description="adamw: AdamW for every parameter; muon: Muon for the blocks' 2-D weights (at muon_lr), "
        "AdamW for embeddings, head, biases and gains (at max_lr)",
    )
    max_lr: float = Field(6e-4, gt=0)
    min_lr_ratio: float = Field(
        0.1, ge=0, le=1, description="final LR as a fraction of max_lr (the schedule's floor)"
    )
    warmup_steps: int = Field(715, ge=0)
    schedule: Literal["cosine", "trapezoid"] = Field(
        "cosine",
        description="cosine: warmup then cosine decay; trapezoid: warmup, max_lr held, then a linear "
        "cool-down over the last cooldown_frac of the steps",
    )
    cooldown_frac: float = Field(
        0.4, gt=0, le=1, description="trapezoid: the share of max_steps spent cooling down"
    )
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="global grad-norm clip; 0 disables")
    muon_lr: float = Field(0.02, gt=0, description="muon: the hidden matrices' peak learning rate")
    muon_momentum: float = Field(0.95, ge=0, lt=1)
    muon_weight_decay: float = Field(0.0, ge=0)


_NO_ROOM_TO_GROW = (
    "train.batch_warmup_steps grows the batch in whole micro-batches, but at {0} x {1} tokens per micro-batch "
    "on {2} rank(s) the batch is one micro-batch: lower train.micro_batch"
)


class TrainConfig(_Section):
    run_dir: str = Field(
        "runs/default", description="fsspec URL everything this run writes goes under"
    )
    max_steps: int = Field(19073, gt=0)
    total_batch_tokens: int = Field(
        524288, gt=0, description="tokens per optimizer step, all ranks"
    )
    micro_batch: int = Field(64, gt=0, description="sequences per rank per micro-step")
    batch_warmup_steps: int = Field(
        0,
        ge=0,
        description="grow the batch over this many first steps, from batch_warmup_start of "
        "total_batch_tokens to all of it, in whole micro-batches (so it needs gradient accumulation: "
        "micro_batch x seq_len x ranks below total_batch_tokens); 0 = build-nanogpt's fixed batch",
    )
    batch_warmup_start: float = Field(
        0.25, gt=0, le=1, description="the first step's share of the batch, with batch_warmup_steps"
    )
    seq_len: int = Field(1024, gt=0)
    seed: int = Field(1337, ge=0, le=2**32 - 1, description="numpy takes seeds of 32 bits")
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="autocast dtype; auto = bf16 on CUDA"
    )
    compile: bool = False
    compile_mode: Literal[
        "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"
    ] = Field("default", description="torch.compile mode; reduce-overhead adds CUDA graphs")
    tf32: bool = True
    attention: Literal["auto", "flash", "cudnn", "efficient", "math", "fa4"] = Field(
        "auto",
        description="SDPA backend on CUDA; auto = PyTorch's choice, any other = that one only; fa4 = "
        "FlashAttention-4 instead of SDPA (the flash-attn-4 package; Hopper and Blackwell GPUs)",
    )
    fused_add_layernorm: bool = Field(
        False,
        description="each residual add and the LayerNorm after it in one Triton kernel, forward and "
        "backward (training/kernels/add_layernorm.py; CUDA); off = PyTorch's ops",
    )
    fused_classifier: bool = Field(
        False,
        description="the loss's softmax, cross-entropy and logit gradient in one Triton kernel, in place of "
        "the logits, as llm.c's fused classifier (training/kernels/classifier.py; CUDA); it takes the path "
        "of loss_chunk, with one chunk of every token when that is 0; off = PyTorch's ops",
    )
    loss_chunk: int = Field(
        0,
        ge=0,
        description="tokens per chunk of the lm_head + cross-entropy, so the full logits never exist "
        "(less memory, a larger micro-batch fits); 0 = plain",
    )
    log_every: int = Field(1, gt=0)
    lease_ttl_s: float = Field(
        60.0,
        gt=0,
        description="the run directory's writer lease is renewed every quarter "
        "of this; a lease of a writer that died on another host is taken after this long",
    )
    heartbeat_seconds: float = Field(
        15.0,
        ge=0,
        description="each rank rewrites {run}/heartbeats/rank-N.json this "
        "often (step, phase, host), so a hung job is noticed from outside; 0 = off",
    )
    collective_timeout_s: float = Field(
        600.0,
        gt=0,
        description="a collective that waits longer than this ends the "
        "job with an error naming the missing ranks (torch's default: 30 min on "
        "gloo); keep it above the longest checkpoint write",
    )
    telemetry_every: int = Field(
        50,
        ge=0,
        description="every this many steps each rank's mean step time, busy "
        "time (until its own last gradient: no waiting on peers) and data wait, its "
        "memory and GPU clock, temperature and power go into {run}/telemetry.jsonl (one "
        "small all_gather), and the slowest rank into that step's metrics line; 0 = off",
    )
    stop_after_steps: int | None = Field(
        None,
        gt=0,
        description="leave after this many steps in this process, checkpointing as on preemption "
        "(a time-boxed allocation); the next launch resumes",
    )
    profile_steps: str | None = Field(
        None,
        description="'A:B': a torch.profiler trace of steps A to B-1 on every rank, into "
        "{run}/profiles/steps_A-B/rank-N.json (Chrome trace format: open it in Perfetto or chrome://tracing)",
    )

    @model_validator(mode="after")
    def _profile_range(self) -> TrainConfig:
        if self.profile_steps is not None:
            _check_ranges([self.profile_steps], "train.profile_steps")
        return self


class CheckpointConfig(_Section):
    checkpoint_every: int = Field(1000, gt=0)
    keep_last: int = Field(3, gt=0, description="keep this many newest checkpoints")
    keep_every: int = Field(
        5000, ge=0, description="also keep every checkpoint whose step is a multiple; 0 = none"
    )
    async_write: bool = Field(
        True,
        description="copy the state to host memory and write it in the background "
        "while training goes on (one write in flight; the last step and a stop for "
        "preemption wait for it); false = every rank waits for the write",
    )


class EvalConfig(_Section):
    val_every: int = Field(250, gt=0)
    val_tokens: int = Field(
        10_485_760,
        gt=0,
        description="tokens per val evaluation, all ranks together (the same tokens whatever "
        "the world size); build-nanogpt: 20 steps x 64 x 1024 x 8 GPUs",
    )
    sample_every: int = Field(1000, ge=0, description="0 disables sampling during training")
    sample_prompt: str = Field("Hello, I'm a language model,", min_length=1)
    sample_count: int = Field(4, gt=0)
    sample_tokens: int = Field(32, gt=0)


class GuardConfig(_Section):
    """The per-step guard (training/guard.py): updates that would break the run are skipped, and repeated
    trouble ends the job as "diverged" (exit code 3) for the flow to roll back past the offending data."""

    skip_nonfinite: bool = Field(
        True,
        description="skip the update of a step whose loss or gradient norm is not "
        "finite (instead of stopping the run)",
    )
    zscore: float = Field(
        8.0,
        ge=0,
        description="skip the update of a step whose loss or gradient norm is this many "
        "standard deviations above the recent ones; 0 = off",
    )
    zscore_window: int = Field(
        100, ge=10, description="steps of history the z-scores are taken over"
    )
    zscore_warmup: int = Field(
        500, ge=0, description="no z-score skips before this step (early training is noisy)"
    )
    max_skips: int = Field(
        5, ge=1, description="this many skipped steps within skip_window steps: diverged"
    )
    skip_window: int = Field(200, ge=1)


class DebugConfig(_Section):
    """Testing aids, off by default: faults injected on purpose, so that the guard, the rollback and the flow
    can be tried on a real run. Never set them in production."""

    fault_steps: list[int] = Field(
        default_factory=list, description="poison these steps' loss (through the whole step)"
    )
    fault_batches: list[str] = Field(
        default_factory=list,
        description="poison the steps that read these "
        "data batches, 'start:stop' ranges of the token stream's step batches",
    )
    fault: Literal["nan", "spike"] = Field(
        "nan",
        description="what poisoning does (a NaN loss, or a loss and gradients 1000 times too large)",
    )
    die_at_step: int | None = Field(
        None,
        ge=0,
        description="every training process kills itself (SIGKILL, as on a node that fails) when it "
        "reaches this step, once per run directory, after any checkpoint still being written has landed: the "
        "resubmission resumes from the last checkpoint before it and goes past it",
    )

    @model_validator(mode="after")
    def _ranges(self) -> DebugConfig:
        _check_ranges(self.fault_batches, "debug.fault_batches")
        return self


class RunConfig(_Section):
    """Everything one training run needs. `name` is informational (shows in logs and the UI)."""

    name: str = "run"
    model: GPTConfig = Field(default_factory=GPTConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    guard: GuardConfig = Field(default_factory=GuardConfig)
    debug: DebugConfig = Field(default_factory=DebugConfig)

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        """Configs written before the faults moved from `guard` to `debug` (checkpoints keep theirs)."""
        if isinstance(data, dict) and isinstance(data.get("guard"), dict):
            moved = {k: data["guard"][k] for k in list(data["guard"]) if k.startswith("fault")}
            if moved:
                data = {**data, "guard": {k: v for k, v in data["guard"].items() if k not in moved}}
                data["debug"] = {**moved, **(data.get("debug") or {})}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        t, m = self.train, self.model
        if m.vocab_size < VOCAB_SIZE:
            raise ValueError(
                f"model.vocab_size ({m.vocab_size}) is smaller than the GPT-2 tokenizer's {VOCAB_SIZE} tokens"
            )
        # an empty run_dir is the current folder; a memory: one is gone at exit
        if not t.run_dir.strip() or t.run_dir.startswith("memory:"):
            raise ValueError(
                f"train.run_dir {t.run_dir!r} is no place for a run: give a folder or a store URL"
            )
        for name, url in (("train.run_dir", t.run_dir), ("data.data_url", self.data.data_url)):
            if url and has_password(url):  # config.json, the logs and the UI would show it
                raise ValueError(
                    f"{name} carries a password in its URL: give the store's credentials through the "
                    "environment (e.g. AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY), not in the URL"
                )
        if self.data.data_url is None:
            self.data.data_url = StoreLayout(LOCAL_STORE).dataset(self.data.dataset)
        if t.seq_len > m.block_size:
            raise ValueError(
                f"train.seq_len ({t.seq_len}) exceeds model.block_size ({m.block_size})"
            )
        per_micro = t.micro_batch * t.seq_len
        if t.total_batch_tokens % per_micro:
            raise ValueError(
                f"train.total_batch_tokens ({t.total_batch_tokens}) must be divisible by "
                f"train.micro_batch x train.seq_len ({t.micro_batch} x {t.seq_len} = {per_micro})"
            )
        if t.batch_warmup_steps and t.total_batch_tokens == per_micro:
            raise ValueError(_NO_ROOM_TO_GROW.format(t.micro_batch, t.seq_len, 1))
        return self

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-steps per optimizer step on each rank; raises when the batch does not split evenly."""
        t = self.train
        per_step = t.micro_batch * t.seq_len * world_size
        if world_size < 1 or t.total_batch_tokens % per_step:
            raise ConfigError(
                f"train.total_batch_tokens ({t.total_batch_tokens}) must be divisible by "
                f"train.micro_batch x train.seq_len x world_size "
                f"({t.micro_batch} x {t.seq_len} x {world_size} = {per_step})"
            )
        if t.batch_warmup_steps and t.total_batch_tokens == per_step:
            raise ConfigError(_NO_ROOM_TO_GROW.format(t.micro_batch, t.seq_len, world_size))
        return t.total_batch_tokens // per_step

    def micro_steps(self, batch: int, world_size: int) -> int:
        """Micro-steps of data batch `batch` on each rank: all of them, or fewer during the batch warm-up (a
        function of the batch alone, so a resumed or rolled-back run reads the data it would have)."""
        full, t = self.grad_accum_steps(world_size), self.train
        if batch >= t.batch_warmup_steps:
            return full
        share = t.batch_warmup_start + (1 - t.batch_warmup_start) * batch / t.batch_warmup_steps
        return max(1, min(full, round(full * share)))

    def val_steps_per_rank(self, world_size: int) -> int:
        t, v = self.train, self.eval.val_tokens
        per_step = t.micro_batch * t.seq_len * world_size
        if v % per_step:
            raise ConfigError(
                f"eval.val_tokens ({v}) must be divisible by train.micro_batch x train.seq_len x world_size "
                f"({t.micro_batch} x {t.seq_len} x {world_size} = {per_step})"
            )
        return v // per_step

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


# ----------------------------------------------------------------------------- loading and overrides


def _leaf_paths(model_cls: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    out = []
    for name, field in model_cls.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _leaf_paths(ann, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


LEAF_PATHS = _leaf_paths()


# keys that moved to another section: the old dotted path still works
MOVED = {f"guard.{k}": f"debug.{k}" for k in ("fault_steps", "fault_batches", "fault")}


def resolve_key(key: str) -> str:
    """Map a `--set` key (dotted path or unique bare name) to its dotted path, or raise naming close matches."""
    if key in LEAF_PATHS:
        return key
    if key in MOVED:
        return MOVED[key]
    matches = [p for p in LEAF_PATHS if p.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(f"config key {key!r} is ambiguous; use one of {matches}")
    names = sorted(set(LEAF_PATHS) | {p.rsplit(".", 1)[-1] for p in LEAF_PATHS})
    close = difflib.get_close_matches(key, names, n=3)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise ConfigError(f"unknown config key {key!r}{hint}")


def _parse_value(raw: str) -> Any:
    # TOML/JSON literals where they parse (numbers, booleans, quoted strings), else the raw string.
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        path = resolve_key(key.strip()).split(".")
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _parse_value(raw.strip())
    return data


def preset_path(name_or_path: str | Path) -> Path:
    """A preset name (`tiny`, `gpt2-124m`, ...: the stems of configs/*.toml) or a path to a TOML file."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise ConfigError(
                f"config file {str(p)!r} {'is a directory' if p.is_dir() else 'does not exist'}"
            )
        return p
    candidate = CONFIG_DIR / f"{name_or_path}.toml"
    if not candidate.exists():
        known = sorted(x.stem for x in CONFIG_DIR.glob("*.toml"))
        raise ConfigError(f"unknown preset {str(name_or_path)!r}; presets: {known}")
    return candidate


def build_config(data: dict[str, Any], source: str = "<dict>") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        known = LEAF_PATHS + sorted({p.rsplit(".", 1)[0] for p in LEAF_PATHS})
        raise ConfigError(validation_message(err, f"config ({source})", known)) from None


def load_config(name_or_path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    path = preset_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read it: {err.strerror}") from None
    apply_overrides(data, list(overrides or []))
    return build_config(data, str(path))


def config_from_json(text: str) -> RunConfig:
    return build_config(json.loads(text), "resolved config.json")
