"""Data prep at cluster scale: a Slurm job array tokenizes the source files (one array task per file, all cores
of its node), then one dependent job lays the parts out as shards (data_prep/parts.py). Same bytes as
`python -m data_prep.fineweb` on one machine; rerunning skips the files already tokenized.

    python -m cluster.prep_array --source 'hf://datasets/HuggingFaceFW/fineweb-edu/sample/10BT/*.parquet' \
        --out s3://bucket/data/fineweb-edu/sample-10BT --cpus-per-task 32 --parallelism 16 --partition cpu --wait

The source must be files (paths, folders, globs, any fsspec URL; hf:// reads the hub's parquet files directly).
Credentials reach the tasks through the environment at run time, as for training (cluster/submit.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import submitit

from data_prep import parts
from data_prep.pipeline import DEFAULT_SHARD_TOKENS, PrepError
from data_prep.sources import FileSource, SourceError, open_source
from training import store


@dataclass
class PrepArrayJobs:
    array: list[submitit.Job]  # one per source file
    assemble: submitit.Job

    def wait(self, progress: bool = False) -> dict:
        """The manifest, or the first failing task's error; `progress`: a bar of finished array tasks."""
        from tqdm import tqdm

        with tqdm(total=len(self.array), unit="file", desc="tokenizing on Slurm", disable=not progress) as bar:
            pending = list(self.array)
            while pending:
                pending = [j for j in pending if not j.done()]
                bar.update(len(self.array) - len(pending) - bar.n)
                if pending:
                    time.sleep(2)
        for job in self.array:
            job.result()  # raises the first failed task's error
        return self.assemble.result()


def submit_prep(source: str, out: str, *, folder: str, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                cpus_per_task: int = 1, parallelism: int = 64, time_min: int = 240, partition: str | None = None,
                account: str | None = None, setup: list[str] | None = None) -> PrepArrayJobs:
    """Check the source and the store, then submit the array and the assembly job (afterok on the array)."""
    src = open_source(source)
    if not isinstance(src, FileSource):
        raise SourceError("a job array needs source files; for the hub, name its parquet files, e.g. "
                          "hf://datasets/HuggingFaceFW/fineweb-edu/sample/10BT/*.parquet")
    if not src.urls:
        raise SourceError(f"{source}: no files")
    store.preflight(out, write=True)
    if store.exists(store.join(out, parts.MANIFEST)):
        manifest = store.read_json(store.join(out, parts.MANIFEST))
        if manifest.get("fingerprint") != parts.fingerprint(src.describe(), shard_tokens, parts.PREFIX):
            raise PrepError(f"{out} is already complete for another source or shard size")
    Path(folder).mkdir(parents=True, exist_ok=True)
    common = dict(time=time_min, setup=list(setup or []), **{k: v for k, v in
                  (("partition", partition), ("account", account)) if v})
    ex = submitit.SlurmExecutor(folder=folder)
    ex.update_parameters(job_name="gpt2-prep-tokenize", cpus_per_task=cpus_per_task, array_parallelism=parallelism,
                         **common)
    n = len(src.urls)
    array = ex.map_array(parts.tokenize_part, [out] * n, src.urls, list(range(n)), [cpus_per_task] * n)
    base = array[0].job_id.split("_")[0]
    ex2 = submitit.SlurmExecutor(folder=folder)
    ex2.update_parameters(job_name="gpt2-prep-assemble", cpus_per_task=1,
                          additional_parameters={"dependency": f"afterok:{base}", "kill_on_invalid_dep": "yes"},
                          **common)
    job = ex2.submit(parts.assemble, out, src.urls, shard_tokens)
    return PrepArrayJobs(array, job)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cluster.prep_array", description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", required=True, help="files: paths, folders, globs or URLs, comma separated")
    ap.add_argument("--out", required=True, help="fsspec URL of the shard store")
    ap.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    ap.add_argument("--folder", default="slurm_logs", help="submitit folder on a shared filesystem")
    ap.add_argument("--cpus-per-task", type=int, default=1, help="cores per array task (its tokenizer processes)")
    ap.add_argument("--parallelism", type=int, default=64, help="array tasks running at once")
    ap.add_argument("--time", type=int, default=240, help="minutes per task")
    ap.add_argument("--partition")
    ap.add_argument("--account")
    ap.add_argument("--wait", action="store_true", help="block until the shards are written")
    args = ap.parse_args(argv)
    try:
        jobs = submit_prep(args.source, args.out, folder=args.folder, shard_tokens=args.shard_tokens,
                           cpus_per_task=args.cpus_per_task, parallelism=args.parallelism, time_min=args.time,
                           partition=args.partition, account=args.account)
    except (SourceError, PrepError, store.StoreError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"array job {jobs.array[0].job_id.split('_')[0]} ({len(jobs.array)} files), "
          f"assembly job {jobs.assemble.job_id}", flush=True)
    if args.wait:
        m = jobs.wait(progress=True)
        print(f"{args.out}: {len(m['shards'])} shards, {m['total_tokens']:,} tokens, {m['documents']:,} documents")
    return 0


if __name__ == "__main__":
    sys.exit(main())
