"""Serve the deployments from this process, without a work pool (a laptop, a single machine):

    python -m flows.serve [--executor local|slurm] [--store URL]
    prefect deployment run pretrain-gpt2/pretrain-124m        # from another shell; watch it in the UI

The deployments are the ones prefect.yaml declares for the `gpt2-slurm` work pool; their parameters are defaults
that every run can override (`--param` / `--params`, or the form in the UI).
"""

from __future__ import annotations

import argparse
import sys

from prefect import serve

from flows.evaluate_checkpoint import evaluate_checkpoint
from flows.params import PretrainParams
from flows.prepare_data import prepare_data
from flows.pretrain import pretrain


def deployments(executor: str, store: str) -> list:
    params = PretrainParams(preset="gpt2-124m", store=store, run_name="gpt2-124m", executor=executor,
                            prepare_source="hf:HuggingFaceFW/fineweb-edu:sample-10BT")
    return [
        pretrain.to_deployment(name="pretrain-124m", parameters={"params": params.model_dump(mode="json")}),
        prepare_data.to_deployment(name="prepare-fineweb-edu",
                                   parameters={"out": f"{store.rstrip('/')}/data/fineweb-edu/sample-10BT"}),
        evaluate_checkpoint.to_deployment(name="evaluate"),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--executor", choices=["local", "slurm"], default="local")
    ap.add_argument("--store", default="store", help="store root (fsspec URL)")
    args = ap.parse_args(argv)
    serve(*deployments(args.executor, args.store))
    return 0


if __name__ == "__main__":
    sys.exit(main())
