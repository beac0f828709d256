"""`prepare-data` (deployed as `prepare-fineweb-edu`): a text source -> GPT-2 token shards in the store
(data_prep/), with progress in the UI.

Idempotent: a store whose manifest.json exists is left as it is (and a store of another source is an error);
an interrupted run resumes from its last finished shard (data_prep/pipeline.py). With `slurm`, source files
are tokenized by a Slurm job array (cluster/prep_array.py); documents already in memory (`demo`) are always
tokenized in the flow's process.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import (
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)

from cluster.spec import JobSpec
from common.errors import ReproError, last_line
from common.shards import read_manifest
from data_prep.sources import DEFAULT_SOURCE, TextsSource, open_source


class PrepareFailure(ReproError):
    pass


async def build_shards(
    src, out: str, shard_tokens: int | None, workers: int | None
) -> dict[str, Any]:
    """data_prep.pipeline in a thread of this process, its progress polled from the shards finished so far."""
    from data_prep import pipeline

    log = get_run_logger()
    total = src.approx_tokens()
    progress = await acreate_progress_artifact(
        0.0, description=f"tokenizing {src.describe().get('kind')} into {out}"
    )
    job = asyncio.create_task(
        asyncio.to_thread(
            pipeline.build, out, src, shard_tokens, workers or os.cpu_count() or 1, progress=False
        )
    )
    while not job.done():
        await asyncio.wait({job}, timeout=10)
        done = pipeline.tokens_done(out)
        if total:
            await aupdate_progress_artifact(progress, min(99.0, 100.0 * done / total))
        log.info("tokenized %s tokens%s", f"{done:,}", f" of ~{total:,}" if total else "")
    manifest = job.result()
    await aupdate_progress_artifact(progress, 100.0)
    return manifest


async def build_shards_on_slurm(
    source: str, out: str, shard_tokens: int | None, spec: JobSpec
) -> dict[str, Any]:
    """The Slurm job array of cluster/prep_array.py (one task per source file, then the assembly job), watched
    without blocking; progress is the fraction of files tokenized."""
    from cluster.prep_array import submit_prep
    from data_prep.parts import parts_done

    log = get_run_logger()
    jobs = await asyncio.to_thread(submit_prep, source, out, spec, shard_tokens=shard_tokens)
    n = len(jobs.array)
    log.info(
        "job array %s: %d source files; assembly job %s",
        jobs.array[0].job_id.split("_")[0],
        n,
        jobs.assemble.job_id,
    )
    progress = await acreate_progress_artifact(
        0.0, description=f"tokenizing {n} files into {out} on Slurm"
    )
    while not await asyncio.to_thread(jobs.assemble.done):
        await asyncio.sleep(5)
        await aupdate_progress_artifact(
            progress, 99.0 * await asyncio.to_thread(parts_done, out, n) / n
        )
    try:
        manifest = await asyncio.to_thread(jobs.wait)
    except (
        Exception
    ) as err:  # submitit re-raises a task's error with its traceback: keep the last line
        raise PrepareFailure(f"data prep job failed: {last_line(str(err)) or err!r}") from None
    await aupdate_progress_artifact(progress, 100.0)
    return manifest


@flow(name="prepare-data", log_prints=True)
async def prepare_data(
    source: str = DEFAULT_SOURCE,
    out: str = "store/data/fineweb-edu/sample-10BT",
    shard_tokens: int | None = None,
    workers: int | None = None,
    credentials_secret: str | None = None,
    slurm: JobSpec | None = None,
) -> dict[str, Any]:
    """FineWeb-Edu (or parquet/jsonl files, or `demo`) -> uint16 shards + manifest.json under `out`; with
    `slurm`, as a Slurm job array over the source files (hf://datasets/... parquet globs for the hub).
    `shard_tokens` defaults to 100M (100k for `demo`)."""
    log = get_run_logger()
    if credentials_secret:
        from flows.credentials import apply_secret

        log.info(
            "store credentials from Secret %r: %s",
            credentials_secret,
            ", ".join(await apply_secret(credentials_secret)),
        )
    m = read_manifest(out)
    if m is not None:
        log.info(
            "%s is complete already: %d shards, %s tokens",
            out,
            len(m["shards"]),
            f"{m['total_tokens']:,}",
        )
    else:
        src = open_source(source)
        if slurm is not None and not isinstance(src, TextsSource):
            m = await build_shards_on_slurm(source, out, shard_tokens, slurm)
        else:
            m = await build_shards(src, out, shard_tokens, workers)
    await acreate_table_artifact(
        [
            {"shard": s["name"], "tokens": s["tokens"], "sha256": s["sha256"][:16]}
            for s in m["shards"]
        ][:200],
        description=f"{out}: shards",
    )
    return {"out": out, "shards": len(m["shards"]), "total_tokens": m["total_tokens"]}
