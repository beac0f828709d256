"""The `pretrain-gpt2` flow's parameters: one typed model, so the Prefect UI renders a form with defaults
and validation. Credentials are never parameters (the UI shows and stores parameters): they come from the
environment of the worker and the jobs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class PretrainParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    preset: str = Field("tiny", description="run preset in configs/ (tiny, gpt2-124m) or a TOML path")
    store: str = Field("store", description="store root (fsspec URL): data/ and runs/ live under it")
    run_name: str = Field("tiny-demo", pattern=r"^[A-Za-z0-9._-]+$", description="run directory name under runs/")
    data: str | None = Field(None, description="token shards URL (default: the preset's data_url under the store)")
    overrides: list[str] = Field(default_factory=list, description="extra `key=value` config overrides")
    executor: Literal["local"] = Field("local", description="where training runs (local subprocess)")
    nproc: int = Field(1, ge=1, description="processes per node (local: torchrun --standalone when > 1)")
    eval_tasks: list[str] = Field(default_factory=lambda: ["hellaswag"], description="evaluation per checkpoint")
    hellaswag_data: str | None = Field(None, description="HellaSwag jsonl (default: {store}/data/hellaswag/...)")
    max_resubmits: int = Field(3, ge=0, description="resubmissions after failures (requeues don't count)")
    backoff_seconds: float = Field(5.0, ge=0)
    poll_seconds: float = Field(2.0, gt=0)

    def run_dir(self) -> str:
        return self.store.rstrip("/") + "/runs/" + self.run_name
