"""Evaluate a checkpoint: HellaSwag (ours) and any lm-eval tasks; results land next to the checkpoint.

    python -m evaluation.evaluate --checkpoint URL --tasks hellaswag[,arc_easy,...] [--hellaswag-data URL] [--limit N]

`hellaswag` means our build-nanogpt scorer; `lm_eval:<task>` (or any other task name) goes to lm-eval, and
`lm_eval` alone stands for its default list (hellaswag, arc_easy, piqa, winogrande, lambada_openai).
Results go to `{checkpoint}/eval/hellaswag.json` and `{checkpoint}/eval/lm_eval.json`; work already done for
the same tasks and limit is skipped, so this can run on every checkpoint, concurrently with training, and
again after a crash. The HF export lm-eval needs is written once to `{run_dir}/exports/step_NNNNNN-hf/`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from common import store
from common.cli import entry_point, positive_int
from common.errors import BadInput
from common.layout import RunDir, eval_result, hf_export
from evaluation import hellaswag as hs
from evaluation.hellaswag_data import parse_examples, read_data
from evaluation.lm_eval_runner import DEFAULT_TASKS
from training import checkpoint as ck
from training import distributed

OURS = "hellaswag"


def default_hellaswag_url(checkpoint_url: str) -> str:
    """The HellaSwag file of the store the checkpoint's run lives in ({store}/runs/{run}/checkpoints/step_N)."""
    run = RunDir.of_checkpoint(checkpoint_url)
    layout = run.store if run is not None else None
    if layout is None:
        raise BadInput(
            f"{checkpoint_url} is not in a store's runs/{{run}}/checkpoints/ folder, so there is no "
            f"store HellaSwag file to default to: give --hellaswag-data"
        )
    return layout.hellaswag


def lm_eval_tasks(tasks: list[str]) -> list[str]:
    """The tasks lm-eval runs of those asked for: all but ours (`hellaswag`); `lm_eval` stands for its default
    set, `lm_eval:NAME` for lm-eval's task of a name ours also has."""
    out: list[str] = []
    for t in tasks:
        if t in ("lm_eval", "lm-eval"):
            out += [x for x in DEFAULT_TASKS if x not in out]
        elif t != OURS and t.removeprefix("lm_eval:") not in out:
            out.append(t.removeprefix("lm_eval:"))
    return out


def _cached(url: str, key: dict[str, Any]) -> dict[str, Any] | None:
    if not store.exists(url):
        return None
    try:
        old = store.read_json(url)
    except ValueError:
        return None
    # another shape: evaluate again
    return old if isinstance(old, dict) and old.get("key") == key else None


def _versions() -> dict[str, str]:
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "code": ck.code_version(),
    }


def run_hellaswag(
    ckpt: ck.Checkpoint,
    data_url: str,
    limit: int | None,
    device: torch.device,
    progress: bool,
    info: distributed.DistInfo,
) -> dict[str, Any]:
    from common.tokenizer import get_encoding
    from training.model import GPT

    out_url = eval_result(ckpt.url, "hellaswag")
    data = read_data(data_url)
    # keyed by the file's content: the same URL holding other examples is evaluated again
    key = {"task": "hellaswag", "data": data_url, "sha256": store.sha256(data), "limit": limit}
    if (hit := _cached(out_url, key)) is not None:
        return {**hit, "cached": True}
    examples = parse_examples(data, data_url, limit)
    model = GPT(ckpt.config().model)
    ck.load_model_state(model, ckpt.model_state_bytes())
    model.to(device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    scores = hs.evaluate(
        model,
        examples,
        get_encoding(),
        device,
        amp,
        progress and info.is_master,
        info.rank,
        info.world_size,
    )
    result = {
        "key": key,
        "step": ckpt.step,
        "checkpoint": ckpt.url,
        **scores,
        "references": hs.REFERENCES,
        "versions": _versions(),
    }
    if info.is_master:
        store.write_json(out_url, result)
    return {**result, "cached": False}


def run_lm_eval(
    ckpt: ck.Checkpoint,
    tasks: list[str],
    limit: int | None,
    device: torch.device,
    batch_size: int,
    include_path: str | None,
    dtype: str | None = None,
) -> dict[str, Any]:
    from evaluation import lm_eval_runner
    from training.hf import export_hf_dir
    from training.model import GPT

    out_url = eval_result(ckpt.url, "lm_eval")
    key = {"tasks": sorted(tasks), "limit": limit, "include_path": include_path}
    if (hit := _cached(out_url, key)) is not None:
        return {**hit, "cached": True}
    config = ckpt.config().model

    def run(hf_dir: Path | None) -> dict[str, Any]:
        return lm_eval_runner.run(
            hf_dir,
            tasks,
            batch_size=batch_size,
            device=str(device),
            limit=limit,
            include_path=include_path,
            max_length=min(1024, config.block_size),
            dtype=dtype or ("bfloat16" if device.type == "cuda" else "float32"),
            checkpoint=None if hf_dir is not None else ckpt.url,
        )

    if config.not_gpt2():  # no Hugging Face GPT-2 holds it: lm-eval runs it in-process
        return _keep_lm_eval(out_url, key, ckpt, None, run(None))
    export_url = hf_export(ckpt.url, ckpt.step)
    tmp = Path(tempfile.mkdtemp(prefix="hf-export-"))
    try:
        model = GPT(config)
        ck.load_model_state(model, ckpt.model_state_bytes())
        export_hf_dir(model, tmp)
        if not store.exists(store.join(export_url, "config.json")):
            # config.json goes last: a reader that sees it sees a complete export
            files = sorted(tmp.iterdir(), key=lambda p: p.name == "config.json")
            for f in files:
                store.write_bytes(store.join(export_url, f.name), f.read_bytes())
        res = run(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _keep_lm_eval(out_url, key, ckpt, export_url, res)


def _keep_lm_eval(
    out_url: str,
    key: dict[str, Any],
    ckpt: ck.Checkpoint,
    export_url: str | None,
    res: dict[str, Any],
) -> dict[str, Any]:
    result = {
        "key": key,
        "step": ckpt.step,
        "checkpoint": ckpt.url,
        "hf_export": export_url,  # None: evaluated in-process (not GPT-2-shaped)
        **res,
        "versions": {**_versions(), "lm_eval": res.pop("lm_eval_version", None)},
    }
    store.write_json(out_url, result)
    return {**result, "cached": False}


def evaluate(
    checkpoint_url: str,
    tasks: list[str],
    *,
    hellaswag_data: str | None = None,
    limit: int | None = None,
    device: str | None = None,
    batch_size: int = 8,
    include_path: str | None = None,
    dtype: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """The per-checkpoint contract the flows call: run what is not done yet, return a summary per task family."""
    if not tasks:
        raise BadInput("no tasks given")
    if limit is not None and limit < 1:
        raise BadInput(f"limit must be a positive number of examples, got {limit}")
    from training.accel import pick_device

    dev = pick_device(device)
    ckpt = ck.resolve(checkpoint_url)
    ckpt.verify()
    ours = [t for t in tasks if t == OURS]
    data = (hellaswag_data or default_hellaswag_url(ckpt.url)) if ours else None
    info = distributed.init(dev.type)
    try:
        summary: dict[str, Any] = {"checkpoint": ckpt.url, "step": ckpt.step}
        others = lm_eval_tasks(tasks)
        if data is not None:  # HellaSwag asked for
            r = run_hellaswag(ckpt, data, limit, dev, progress, info)
            summary["hellaswag"] = {k: r[k] for k in ("acc", "acc_norm", "n", "cached")}
        if others and info.is_master:
            r = run_lm_eval(ckpt, others, limit, dev, batch_size, include_path, dtype)
            summary["lm_eval"] = {
                "tasks": r["tasks"],
                "n_samples": r["n_samples"],
                "cached": r["cached"],
            }
        return summary
    finally:
        distributed.shutdown()


@entry_point
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m evaluation.evaluate", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint dir or run dir (latest checkpoint); fsspec URL",
    )
    ap.add_argument(
        "--tasks",
        default="hellaswag",
        help="comma-separated: hellaswag (ours) and/or lm-eval task names",
    )
    ap.add_argument(
        "--hellaswag-data",
        default=None,
        help="HellaSwag val jsonl URL (default: {store}/data/hellaswag/)",
    )
    ap.add_argument(
        "--limit", type=positive_int, default=None, help="evaluate the first N examples per task"
    )
    ap.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when there is one)"
    )
    ap.add_argument("--batch-size", type=positive_int, default=8, help="lm-eval batch size")
    ap.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="lm-eval model dtype (default: bfloat16 on CUDA, float32 on CPU)",
    )
    ap.add_argument("--include-path", default=None, help="folder of extra lm-eval task YAMLs")
    args = ap.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.hellaswag_data:
        store.preflight(args.hellaswag_data, write=False)
    summary = evaluate(
        args.checkpoint,
        tasks,
        hellaswag_data=args.hellaswag_data,
        limit=args.limit,
        device=args.device,
        batch_size=args.batch_size,
        include_path=args.include_path,
        dtype=args.dtype,
        progress=True,
    )
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank returns the same summary
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
