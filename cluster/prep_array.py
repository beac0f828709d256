"""Data prep at cluster scale: a Slurm job array tokenizes the source files (one array task per file, all cores
of its node), then one dependent job lays the parts out as shards (data_prep/parts.py). Same bytes as
`python -m data_prep.fineweb` on one machine; rerunning skips the files already tokenized.

    python -m cluster.prep_array --source 'hf://datasets/HuggingFaceFW/fineweb-edu/sample/10BT/*.parquet' \
        --out s3://bucket/data/fineweb-edu/sample-10BT --cpus-per-task 32 --parallelism 16 --partition cpu --wait

The source must be files (paths, folders, globs, any fsspec URL; hf:// reads the hub's parquet files directly).
The jobs are shaped by a JobSpec like training's (flags or --spec: partition, account, qos, memory, container,
extra sbatch options, ...), one node each. Credentials reach the tasks through the environment at run time, as
for training (cluster/submit.py).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import submitit

from cluster.sbatch import build_executor
from cluster.spec import JobSpec
from cluster.validate import require_slurm_client
from common import exit_codes, store
from common.cli import (
    add_model_flags,
    entry_point,
    model_from_flags,
    positive_int,
    read_json_object,
)
from common.shards import PREFIX
from data_prep import parts
from data_prep.pipeline import DEFAULT_SHARD_TOKENS, claim_output, complete_manifest, fingerprint
from data_prep.sources import FileSource, SourceError, open_source


@dataclass
class PrepArrayJobs:
    array: list[submitit.Job]  # one per source file
    assemble: submitit.Job

    def wait(self, progress: bool = False) -> dict:
        """The manifest, or the first failing task's error; `progress`: a bar of finished array tasks."""
        from tqdm import tqdm

        with tqdm(
            total=len(self.array), unit="file", desc="tokenizing on Slurm", disable=not progress
        ) as bar:
            pending = list(self.array)
            while pending:
                pending = [j for j in pending if not j.done()]
                bar.update(len(self.array) - len(pending) - bar.n)
                if pending:
                    time.sleep(2)
        for job in self.array:
            job.result()  # raises the first failed task's error
        return self.assemble.result()


def submit_prep(
    source: str,
    out: str,
    spec: JobSpec,
    *,
    shard_tokens: int | None = None,
    parallelism: int = 64,
    force: bool = False,
) -> PrepArrayJobs:
    """Check the source and the store, then submit the array (one task of `spec` per source file, at most
    `parallelism` at once) and the assembly job (afterok on the array). `force`: as data_prep's."""
    src = open_source(source)
    if not isinstance(src, FileSource):
        raise SourceError(
            "a job array needs source files; for the hub, name its parquet files, e.g. "
            "hf://datasets/HuggingFaceFW/fineweb-edu/sample/10BT/*.parquet"
        )
    if not src.urls:
        raise SourceError(f"{source}: no files")
    shard_tokens = shard_tokens or DEFAULT_SHARD_TOKENS
    require_slurm_client()
    store.preflight(out, write=True)
    claim_output(out, force)
    complete_manifest(
        out, fingerprint(src.describe(), shard_tokens, PREFIX)
    )  # another source's store: refused
    one_node = spec.model_copy(update={"nodes": 1})
    workers = spec.cpus_per_task or 1
    n = len(src.urls)
    array = build_executor(
        one_node, job_name="gpt2-prep-tokenize", array_parallelism=parallelism
    ).map_array(parts.tokenize_part, [out] * n, src.urls, list(range(n)), [workers] * n)
    base = array[0].job_id.split("_")[0]
    assembly = build_executor(
        one_node,
        job_name="gpt2-prep-assemble",
        cpus_per_task=1,
        sbatch={"dependency": f"afterok:{base}", "kill_on_invalid_dep": "yes"},
    )
    return PrepArrayJobs(array, assembly.submit(parts.assemble, out, src.urls, shard_tokens))


@entry_point
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m cluster.prep_array", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument(
        "--source", required=True, help="files: paths, folders, globs or URLs, comma separated"
    )
    ap.add_argument("--out", required=True, help="fsspec URL of the shard store")
    ap.add_argument(
        "--shard-tokens", type=positive_int, default=None, help=f"default {DEFAULT_SHARD_TOKENS:,}"
    )
    ap.add_argument(
        "--parallelism", type=positive_int, default=64, help="array tasks running at once"
    )
    ap.add_argument(
        "--force",
        action="store_true",
        help="write into --out although it holds other shards or files",
    )
    ap.add_argument(
        "--spec", help="JSON file with JobSpec fields for every task (the flags below override it)"
    )
    ap.add_argument("--wait", action="store_true", help="block until the shards are written")
    add_model_flags(
        ap, JobSpec, aliases={"time_min": ["--time"]}, skip=("nodes", "max_preemption_requeues")
    )
    args = ap.parse_args(argv)
    spec = model_from_flags(
        JobSpec, args, {"time_min": 240, **read_json_object(args.spec, "--spec")}
    )
    jobs = submit_prep(
        args.source,
        args.out,
        spec,
        shard_tokens=args.shard_tokens,
        parallelism=args.parallelism,
        force=args.force,
    )
    print(
        f"array job {jobs.array[0].job_id.split('_')[0]} ({len(jobs.array)} files), "
        f"assembly job {jobs.assemble.job_id}",
        flush=True,
    )
    if args.wait:
        m = jobs.wait(progress=True)
        print(
            f"{args.out}: {len(m['shards'])} shards, {m['total_tokens']:,} tokens, {m['documents']:,} documents"
        )
    return exit_codes.OK


if __name__ == "__main__":
    raise SystemExit(main())
