"""Serve the deployments from this process, without a work pool (a laptop, a single machine):

    python -m flows.serve [--executor local|slurm] [--store URL]
    prefect deployment run pretrain-gpt2/pretrain-124m        # from another shell; watch it in the UI
    prefect deployment run pretrain-gpt2/demo                 # the demo: minutes on a CPU, fully offline
    prefect deployment run pretrain-sweep/demo-sweep          # a sweep of the demo: four runs, some pruned
    python -m flows.follow RUN_ID                             # its story on the console, until it ends

The deployments are the ones prefect.yaml declares for the `gpt2-slurm` work pool, plus the demos (`demo`,
`demo-sweep`); their parameters are defaults that every run can override (`--params`, or the form in the UI).
"""

from __future__ import annotations

import argparse
import json

from prefect import serve

from common.cli import entry_point
from common.errors import BadInput
from common.layout import StoreLayout
from common.store import is_local
from flows.evaluate_checkpoint import evaluate_checkpoint
from flows.params import EvaluationParams, PretrainParams
from flows.prefect_server import api_problem
from flows.prepare_data import prepare_data
from flows.pretrain import pretrain
from flows.sweep import SweepParams, sweep
from flows.sweep_space import Dimension, SweepSpace


def demo_params(store: str, max_steps: int | None = None) -> PretrainParams:
    """The demo run: the `demo` preset on the offline corpus, every checkpoint evaluated on the demo's
    HellaSwag-format task (evaluation/demo_task.py) by our scorer and by lm-eval over the same file. A shortened
    run (`max_steps`) is a run of its own, with two checkpoints."""
    task = StoreLayout(store).demo_eval
    short = (
        []
        if max_steps is None
        else [f"max_steps={max_steps}", f"checkpoint_every={max(1, max_steps // 2)}"]
    )
    return PretrainParams(
        preset="demo",
        store=store,
        run_name="demo" if max_steps is None else f"demo-{max_steps}",
        overrides=short,
        evaluation=EvaluationParams(
            tasks=["hellaswag", "demo_hellaswag"],
            hellaswag_data=f"{task}/demo_hellaswag.jsonl",
            include_path=task,
        ),
        poll_seconds=1.0,
    )


def demo_sweep_params(store: str) -> SweepParams:
    """The demo sweep: four peak learning rates of the demo model for 150 steps each, two at a time, the ones
    behind pruned by successive halving at their validations, every checkpoint evaluated as in the demo, and a
    node failure (injected) in each trial that gets to step 80, resubmitted by the trial's flow."""
    demo = demo_params(store)
    return SweepParams(
        name="demo-sweep",
        space=SweepSpace(
            preset="demo",
            overrides=[
                *["max_steps=150", "val_every=25", "checkpoint_every=75", "sample_every=0"],
                # a node that fails: every trial that gets to step 80 dies there once, as on a cluster, and
                # its flow resubmits it from its checkpoint at 75 (the sweep's result lists it)
                "debug.die_at_step=80",
            ],
            dimensions=[Dimension(key="optim.max_lr", choices=[3e-2, 1e-2, 3e-3, 3e-4])],
            sampler="grid",
            trials=4,
            max_concurrent=2,
        ),
        run=demo.model_copy(update={"run_name": "demo-sweep", "overrides": []}),
        pruner="halving",
    )


def deployments(executor: str, store: str) -> list:
    params = PretrainParams(
        preset="gpt2-124m",
        store=store,
        run_name="gpt2-124m",
        executor=executor,
        prepare_source="hf:HuggingFaceFW/fineweb-edu:sample-10BT",
    )
    larger = [
        PretrainParams(
            preset=f"gpt2-{size}", store=store, run_name=f"gpt2-{size}", executor=executor
        )
        for size in ("350m", "774m", "1558m")
    ]  # llm.c's reproductions, on their presets' data
    return [
        pretrain.to_deployment(
            name="pretrain-124m", parameters={"params": params.model_dump(mode="json")}
        ),
        *[
            pretrain.to_deployment(
                name=f"pretrain-{p.preset.removeprefix('gpt2-')}",
                parameters={"params": p.model_dump(mode="json")},
            )
            for p in larger
        ],
        pretrain.to_deployment(
            name="demo",
            parameters={"params": demo_params(store).model_dump(mode="json")},
            description="The pipeline in minutes on a CPU, offline: demo corpus -> shards -> "
            "training -> every checkpoint evaluated -> report.",
        ),
        prepare_data.to_deployment(
            name="prepare-fineweb-edu",
            parameters={"out": StoreLayout(store).dataset("fineweb-edu/sample-10BT")},
        ),
        evaluate_checkpoint.to_deployment(name="evaluate"),
        sweep.to_deployment(
            name="demo-sweep",
            parameters={"params": demo_sweep_params(store).model_dump(mode="json")},
            description="Four learning rates of the demo model, two at a time, the ones behind pruned: "
            "minutes on a CPU, offline.",
        ),
    ]


@entry_point
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--executor", choices=["local", "slurm"], default="local")
    ap.add_argument("--store", default="store", help="store root (fsspec URL)")
    ap.add_argument(
        "--print-demo-params",
        type=int,
        metavar="MAX_STEPS",
        default=None,
        help="print the demo deployment's parameters for a run of MAX_STEPS steps (0: the preset's) "
        "as `prefect deployment run --params` takes them, and exit",
    )
    args = ap.parse_args(argv)
    if args.print_demo_params is not None:
        p = demo_params(args.store, args.print_demo_params or None)
        print(json.dumps({"params": p.model_dump(mode="json")}))
        return 0
    problem = api_problem()
    if problem:
        raise BadInput(problem)
    if is_local(args.store):  # the demos' evaluation task, which their runs check before training
        from evaluation.demo_task import build as stage_demo_task

        stage_demo_task(args.store)
    serve(*deployments(args.executor, args.store))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
