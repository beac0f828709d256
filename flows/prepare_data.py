"""`prepare-data`: a text source -> GPT-2 token shards in the store (data_prep/), with progress in the UI.

Idempotent: a store whose manifest.json exists is left as it is (and a store of another source is an error);
an interrupted run resumes from its last finished shard (data_prep/pipeline.py).
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact

from cluster.spec import JobSpec
from data_prep.shards import MANIFEST
from training import store

DEMO_SOURCE = "demo"  # the offline corpus: Python standard library docstrings (data_prep/demo_corpus.py)


class PrepareFailure(RuntimeError):
    pass


def _done_tokens(out: str) -> int:
    """Tokens in shards finished so far (their resume sidecars), cheap enough to poll."""
    fs, path = store.fs_and_path(store.join(out, ".prep"))
    try:
        names = fs.glob(path.rstrip("/") + "/*.json")
    except (FileNotFoundError, OSError):
        return 0
    total = 0
    for name in names:
        try:
            total += json.loads(fs.cat_file(name))["shard"]["tokens"]
        except (OSError, ValueError, KeyError):
            pass
    return total


async def build_shards(source: str, out: str, shard_tokens: int, workers: int | None) -> dict[str, Any]:
    """The flow's body (also called by pretrain-gpt2 when its data is missing)."""
    log = get_run_logger()
    manifest_url = store.join(out, MANIFEST)
    if store.exists(manifest_url):
        m = store.read_json(manifest_url)
        log.info("%s is complete already: %d shards, %s tokens", out, len(m["shards"]), f"{m['total_tokens']:,}")
        return m
    if source == DEMO_SOURCE:
        from data_prep.demo_corpus import build

        log.info("building the offline demo corpus (stdlib docstrings) in %s", out)
        await asyncio.to_thread(build, out)
        return store.read_json(manifest_url)

    from data_prep import pipeline
    from data_prep.sources import SourceError, open_source

    try:
        src = open_source(source)
    except SourceError as err:
        raise PrepareFailure(f"bad source: {err}") from None
    total = src.approx_tokens()
    progress = await create_progress_artifact(0.0, description=f"tokenizing {source} into {out}")
    job = asyncio.create_task(asyncio.to_thread(pipeline.build, out, src, shard_tokens, workers or os.cpu_count() or 1,
                                                progress=False))
    while not job.done():
        await asyncio.wait({job}, timeout=10)
        done = _done_tokens(out)
        if total:
            await update_progress_artifact(progress, min(99.0, 100.0 * done / total))
        log.info("tokenized %s tokens%s", f"{done:,}", f" of ~{total:,}" if total else "")
    try:
        manifest = job.result()
    except (pipeline.PrepError, SourceError, store.StoreError) as err:
        raise PrepareFailure(str(err)) from None
    await update_progress_artifact(progress, 100.0)
    return manifest


async def build_shards_on_slurm(source: str, out: str, shard_tokens: int, spec: JobSpec) -> dict[str, Any]:
    """The Slurm job array of cluster/prep_array.py (one task per source file, then the assembly job), watched
    without blocking; progress is the fraction of files tokenized."""
    from cluster.prep_array import submit_prep
    from data_prep import parts

    log = get_run_logger()
    manifest_url = store.join(out, MANIFEST)
    if store.exists(manifest_url):
        return store.read_json(manifest_url)
    try:
        jobs = await asyncio.to_thread(submit_prep, source, out, folder=spec.folder, shard_tokens=shard_tokens,
                                       cpus_per_task=spec.cpus_per_task or 1, time_min=spec.time_min,
                                       partition=spec.partition, account=spec.account, setup=spec.setup)
    except Exception as err:
        raise PrepareFailure(f"job array not submitted: {err}") from None
    n = len(jobs.array)
    log.info("job array %s: %d source files; assembly job %s", jobs.array[0].job_id.split("_")[0], n,
             jobs.assemble.job_id)
    progress = await create_progress_artifact(0.0, description=f"tokenizing {n} files into {out} on Slurm")
    while not await asyncio.to_thread(jobs.assemble.done):
        await asyncio.sleep(5)
        done = sum(store.exists(parts.sidecar_url(out, i)) for i in range(n))
        await update_progress_artifact(progress, 99.0 * done / n)
    try:
        manifest = await asyncio.to_thread(jobs.wait)
    except Exception as err:
        lines = [ln for ln in str(err).splitlines() if ln.strip()]
        raise PrepareFailure(f"data prep job failed: {lines[-1] if lines else err}") from None
    await update_progress_artifact(progress, 100.0)
    return manifest


@flow(name="prepare-data", log_prints=True)
async def prepare_data(source: str = "hf:HuggingFaceFW/fineweb-edu:sample-10BT", out: str = "store/data/fineweb-edu",
                       shard_tokens: int = 100_000_000, workers: int | None = None,
                       credentials_secret: str | None = None, slurm: JobSpec | None = None) -> dict[str, Any]:
    """FineWeb-Edu (or parquet/jsonl files, or `demo`) -> uint16 shards + manifest.json under `out`; with
    `slurm`, as a Slurm job array over the source files (hf://datasets/... parquet globs for the hub)."""
    if credentials_secret:
        from flows.credentials import apply_secret

        get_run_logger().info("store credentials from Secret %r: %s", credentials_secret,
                              ", ".join(await apply_secret(credentials_secret)))
    if slurm is not None and source != DEMO_SOURCE:
        m = await build_shards_on_slurm(source, out, shard_tokens, slurm)
    else:
        m = await build_shards(source, out, shard_tokens, workers)
    await create_table_artifact([{"shard": s["name"], "tokens": s["tokens"], "sha256": s["sha256"][:16]}
                                 for s in m["shards"]][:200], description=f"{out}: shards")
    return {"out": out, "shards": len(m["shards"]), "total_tokens": m["total_tokens"]}
