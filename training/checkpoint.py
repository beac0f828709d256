"""Checkpoint format, atomic writes, validation and retention, and the RNG state a checkpoint stores.

    {run_dir}/checkpoints/step_000500/           (common/layout.py: RunDir.checkpoint)
        model.safetensors    weights (padded vocab rows included; a tied lm_head is stored once, as wte)
        optimizer.pt         AdamW state_dict
        rank_00000.pt ...    per-rank loader state and RNG states (python, numpy, torch CPU, CUDA)
        train_state.json     step, resolved config, code version, world size, anything the loop adds
        manifest.json        written LAST: every file's size and sha256. No manifest = not a checkpoint.

Readers trust the manifest, never the listing, and verify each file's sha256 as they read it; a checkpoint
that fails is skipped with a warning and the previous one is used. Nothing here unpickles code:
tensors go through safetensors and `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import io
import json
import logging
import random
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from common import store
from common.errors import BadInput
from common.layout import RunDir
from training.config import RunConfig, config_from_json
from training.model import GPT, unwrap
from training.optim import Optimizer

log = logging.getLogger(__name__)

FORMAT = "gpt2-repro-checkpoint/1"
MANIFEST = "manifest.json"
_TIED = "lm_head.weight"


class CheckpointError(BadInput):
    """A checkpoint that is missing, incomplete or corrupt; the message names it."""


def code_version() -> str:
    """The git commit of the code that wrote the checkpoint (with +dirty), or the package version."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
        if rev.returncode == 0:
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=root,
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return "gpt2-repro " + version("gpt2-repro")
    except PackageNotFoundError:
        return "unknown"


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def load_model_state(model: torch.nn.Module, data: bytes) -> None:
    sd = st_load(data)
    if _TIED not in sd:  # a tied head is stored once, as wte; an untied one under its own name
        sd[_TIED] = sd["transformer.wte.weight"]
    unwrap(model).load_state_dict(sd, strict=True)


# ----------------------------------------------------------------------------- RNG state (per rank)


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every generator training draws from (python, numpy, torch CPU, CUDA), as tensors and plain numbers
    that `torch.load(weights_only=True)` reads back."""
    np_state = cast(
        tuple, np.random.get_state(legacy=True)
    )  # ("MT19937", keys, pos, has_gauss, cached)
    state = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            n["key"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ----------------------------------------------------------------------------- writing


def _to_host(obj: Any) -> Any:
    """`obj` with every tensor copied to host memory (pinned, for an asynchronous copy from the GPU): a
    snapshot that the next optimizer step, which updates parameters and AdamW state in place, cannot touch."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.device.type == "cuda":
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
        return t.clone()
    if isinstance(obj, dict):
        return {k: _to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_host(v) for v in obj)
    return obj


@dataclass
class Snapshot:
    """One checkpoint's state, copied off the training tensors and ready to be written while training goes on.
    Every rank holds its own rank file; rank 0 also the shared state and every rank's file record."""

    url: str
    step: int
    world_size: int
    rank_name: str
    rank_bytes: bytes
    records: list[dict[str, Any]] | None = None  # rank 0 only, from here down
    model_state: dict[str, torch.Tensor] | None = None
    optimizer_state: dict[str, Any] | None = None
    train_state: bytes = b""

    def write(self, wait_s: float = 600.0) -> str | None:
        """This rank's files; on rank 0 the shared ones, then, once every rank's file is in the store (the
        ranks write at the same time), the manifest. Returns the checkpoint URL on rank 0."""
        store.write_bytes(store.join(self.url, self.rank_name), self.rank_bytes)
        if self.records is None or self.model_state is None:
            return None
        files = {r["name"]: {"bytes": r["bytes"], "sha256": r["sha256"]} for r in self.records}
        shared = {
            "model.safetensors": st_save(self.model_state, metadata={"format": FORMAT}),
            "train_state.json": self.train_state,
        }
        if self.optimizer_state is not None:
            shared["optimizer.pt"] = _torch_bytes(self.optimizer_state)
        for name, blob in shared.items():
            store.write_bytes(store.join(self.url, name), blob)
            files[name] = {"bytes": len(blob), "sha256": store.sha256(blob)}
        _await_files(self.url, {r["name"]: r["bytes"] for r in self.records}, wait_s)
        store.write_json(
            store.join(self.url, MANIFEST),
            {"format": FORMAT, "step": self.step, "world_size": self.world_size, "files": files},
        )
        return self.url


def _await_files(url: str, sizes: dict[str, int], wait_s: float) -> None:
    """Until every rank's file is in the store at its size (each write is atomic), or CheckpointError."""
    deadline = time.monotonic() + wait_s
    for name, size in sizes.items():
        fs, path = store.fs_and_path(store.join(url, name))
        while True:
            fs.invalidate_cache(path)  # object stores cache listings
            if fs.exists(path) and fs.size(path) == size:
                break
            if time.monotonic() > deadline:
                raise CheckpointError(
                    f"{url}: {name} did not arrive within {wait_s:.0f} s; no manifest written"
                )
            time.sleep(0.05)


def snapshot_checkpoint(
    run_dir: str,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: Optimizer | None,
    config: RunConfig,
    rank_state: dict[str, Any],
    rank: int = 0,
    world_size: int = 1,
    train_state: dict[str, Any] | None = None,
    gather: Callable[[Any], list[Any] | None] | None = None,
) -> Snapshot:
    """The state of one checkpoint, taken collectively: every rank calls this with its own `rank_state`;
    `gather` sends each rank's file record to rank 0 (None on the others; in a single process,
    `lambda x: [x]`). Rank 0 also copies the weights and the optimizer state to host memory."""
    url = RunDir(run_dir).checkpoint(step)
    gather = gather or (lambda x: [x])
    rank_name = f"rank_{rank:05d}.pt"
    data = _torch_bytes(rank_state)
    records = gather({"name": rank_name, "bytes": len(data), "sha256": store.sha256(data)})
    snap = Snapshot(url, step, world_size, rank_name, data)
    if rank != 0 or records is None:
        return snap
    if len({r["name"] for r in records}) != world_size:
        raise CheckpointError(
            f"{url}: expected {world_size} rank states, got {sorted(r['name'] for r in records)}"
        )
    snap.records = records
    plain = unwrap(model)
    tied = plain.lm_head.weight is plain.transformer.wte.weight
    snap.model_state = _to_host(
        {k: v for k, v in plain.state_dict().items() if not (tied and k == _TIED)}
    )
    snap.optimizer_state = _to_host(optimizer.state_dict()) if optimizer is not None else None
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the pinned copies are complete before anyone reads them
    snap.train_state = json.dumps(
        {
            "step": step,
            "world_size": world_size,
            "code_version": code_version(),
            "config": json.loads(config.to_json()),
            **(train_state or {}),
        },
        indent=2,
    ).encode()
    return snap


def write_checkpoint(run_dir: str, step: int, **kwargs: Any) -> str | None:
    """Take and write one checkpoint collectively (`snapshot_checkpoint`'s arguments); its URL on rank 0."""
    return snapshot_checkpoint(run_dir, step, **kwargs).write()


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class TrainState:
    """train_state.json: what a checkpoint says of its run at its step, beside the weights. The loop adds
    `data` (the shards it trained on: {"url", "fingerprint"}), `guard` (the guard's history), `data_batch` (the
    position in the token stream, in step batches) and `tokens_seen`; older checkpoints lack some of them."""

    step: int
    world_size: int
    code_version: str
    config: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)
    guard: dict[str, Any] = field(default_factory=dict)
    data_batch: int | None = None
    tokens_seen: int | None = None

    @classmethod
    def parse(cls, obj: Any, where: str) -> TrainState:
        """The record, or a CheckpointError naming the file and the field that is not what it must be."""
        if not isinstance(obj, dict):
            raise CheckpointError(f"{where}: train_state.json is not a JSON object")
        kinds: dict[str, tuple[type, ...]] = {
            "step": (int,), "world_size": (int,), "code_version": (str,), "config": (dict,),
            "data": (dict, type(None)), "guard": (dict,), "data_batch": (int, type(None)),
            "tokens_seen": (int, type(None)),
        }  # fmt: skip
        for name, kind in kinds.items():
            value = obj.get(name) if name in obj else cls.__dataclass_fields__[name].default
            if name in ("step", "world_size", "code_version", "config") and name not in obj:
                raise CheckpointError(f"{where}: train_state.json has no {name!r}")
            if name in obj and (isinstance(value, bool) or not isinstance(value, kind)):
                raise CheckpointError(f"{where}: train_state.json's {name!r} is {value!r}")
        return cls(
            obj["step"],
            obj["world_size"],
            obj["code_version"],
            obj["config"],
            obj.get("data") or {},
            obj.get("guard", {}),
            obj.get("data_batch"),
            obj.get("tokens_seen"),
        )


@dataclass
class Checkpoint:
    url: str
    manifest: dict[str, Any]
    _cache: dict[str, bytes] = field(default_factory=dict, repr=False)

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def world_size(self) -> int:
        return int(self.manifest["world_size"])

    def read(self, name: str) -> bytes:
        """A file's bytes, verified against the manifest's sha256."""
        if name in self._cache:
            return self._cache[name]
        meta = self.manifest["files"].get(name)
        if meta is None:
            raise CheckpointError(f"{self.url}: {name} is not in the manifest")
        try:
            data = store.read_bytes(store.join(self.url, name))
        except FileNotFoundError:
            raise CheckpointError(
                f"{self.url}: {name} is listed in the manifest but missing"
            ) from None
        if len(data) != meta["bytes"] or store.sha256(data) != meta["sha256"]:
            raise CheckpointError(
                f"{self.url}: {name} is corrupt (size or sha256 differs from the manifest)"
            )
        if name.endswith(".json"):
            self._cache[name] = data
        return data

    def train_state(self) -> TrainState:
        """train_state.json, which must agree with the manifest on the step and the world size (both are
        hashed: an edited manifest must not resume the weights of another step)."""
        try:
            obj = json.loads(self.read("train_state.json"))
        except ValueError as err:
            raise CheckpointError(f"{self.url}: train_state.json is not JSON ({err})") from None
        state = TrainState.parse(obj, self.url)
        if (state.step, state.world_size) != (self.step, self.world_size):
            raise CheckpointError(
                f"{self.url}: its manifest says step {self.step} of {self.world_size} ranks, its "
                f"train_state.json step {state.step} of {state.world_size}: not resumed from"
            )
        return state

    def config(self) -> RunConfig:
        return config_from_json(json.dumps(self.train_state().config))

    def model_state_bytes(self) -> bytes:
        return self.read("model.safetensors")

    def optimizer_state(self) -> dict[str, Any]:
        return torch.load(
            io.BytesIO(self.read("optimizer.pt")), map_location="cpu", weights_only=True
        )

    def rank_state(self, rank: int) -> dict[str, Any]:
        return torch.load(
            io.BytesIO(self.read(f"rank_{rank:05d}.pt")), map_location="cpu", weights_only=True
        )

    def verify(self) -> None:
        """Read and hash every file, and check the train state against the manifest (the thorough check
        before trusting a checkpoint to resume from)."""
        for name in self.manifest["files"]:
            self.read(name)
        self.train_state()


def open_checkpoint(url: str) -> Checkpoint:
    try:
        manifest = store.read_json(store.join(url, MANIFEST))
    except FileNotFoundError:
        raise CheckpointError(f"{url}: no {MANIFEST} (incomplete or not a checkpoint)") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{url}: unreadable {MANIFEST}: {err}") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise CheckpointError(f"{url}: {MANIFEST} is not a {FORMAT} manifest ({problem})")
    return Checkpoint(url=url, manifest=manifest)


def _manifest_problem(m: Any) -> str | None:
    """What makes `m` no checkpoint manifest, or None."""
    if not isinstance(m, dict):
        return "not a JSON object"
    if m.get("format") != FORMAT:
        return f"format {m.get('format')!r}"
    for name in ("step", "world_size"):
        if isinstance(m.get(name), bool) or not isinstance(m.get(name), int) or m[name] < 0:
            return f"{name} is {m.get(name)!r}"
    files = m.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(f, dict) and isinstance(f.get("bytes"), int) and isinstance(f.get("sha256"), str)
        for f in files.values()
    ):
        return "its files are not {name: {bytes, sha256}}"
    return None


def list_steps(run_dir: str) -> list[int]:
    """Steps that have a directory under checkpoints/ (complete or not), ascending."""
    steps = (RunDir.step_of(name) for name in store.listdir(RunDir(run_dir).checkpoints))
    return sorted(s for s in steps if s is not None)


def complete_steps(run_dir: str) -> list[int]:
    """Steps whose checkpoint has its manifest (was written to the end), valid or not, ascending."""
    return [
        s
        for s in list_steps(run_dir)
        if store.exists(store.join(RunDir(run_dir).checkpoint(s), MANIFEST))
    ]


def _valid_newest_first(run_dir: str, verify: bool):
    for step in reversed(list_steps(run_dir)):
        try:
            ckpt = open_checkpoint(RunDir(run_dir).checkpoint(step))
            if verify:
                ckpt.verify()
        except CheckpointError as err:
            log.warning("skipping checkpoint: %s", err)
            continue
        yield ckpt


def valid_checkpoints(run_dir: str, verify: bool = False) -> list[Checkpoint]:
    """Complete checkpoints, newest first; incomplete or corrupt ones are skipped with a warning."""
    return list(_valid_newest_first(run_dir, verify))


def latest_checkpoint(run_dir: str, verify: bool = True) -> Checkpoint | None:
    """The newest checkpoint that passes validation (every file hashed when `verify`), or None."""
    return next(_valid_newest_first(run_dir, verify), None)


def resolve(url: str) -> Checkpoint:
    """A checkpoint directory, or a run directory (its latest valid checkpoint)."""
    store.preflight(url, write=False)  # no credentials, no bucket: one clear line before any read
    if store.exists(store.join(url, MANIFEST)):
        return open_checkpoint(url)
    if store.exists(RunDir(url).checkpoints):
        ckpt = latest_checkpoint(url)
        if ckpt is None:
            raise CheckpointError(f"{url}: no valid checkpoint under checkpoints/")
        return ckpt
    raise CheckpointError(
        f"{url}: neither a checkpoint (no {MANIFEST}) nor a run directory (no checkpoints/)"
    )


def load_model(url: str, device: str | torch.device = "cpu") -> tuple[GPT, RunConfig, int]:
    """The model stored in a checkpoint (or a run's latest checkpoint): (model in eval mode, config, step)."""
    ckpt = resolve(url)
    config = ckpt.config()
    model = GPT(config.model)
    load_model_state(model, ckpt.model_state_bytes())
    return model.to(device).eval(), config, ckpt.step


# ----------------------------------------------------------------------------- retention


def prune(run_dir: str, keep_last: int, keep_every: int, current_step: int) -> list[int]:
    """Delete checkpoints outside keep-last-K and keep-every-N, and stale incomplete ones. Returns deleted steps."""
    complete = [c.step for c in valid_checkpoints(run_dir)]
    keep = set(sorted(complete)[-keep_last:]) | {
        s for s in complete if keep_every and s % keep_every == 0
    }
    keep.add(current_step)
    deleted = []
    for step in list_steps(run_dir):
        if step not in keep:
            store.remove_tree(RunDir(run_dir).checkpoint(step))
            deleted.append(step)
    return deleted
