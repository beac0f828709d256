"""What a run achieved, in a few lines a person reads: its losses against its data's unigram entropy, every
checkpoint's evaluations, the best checkpoint, the last samples.

    python -m evaluation.summary RUN_URL
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from common import store
from common.cli import entry_point
from common.errors import BadInput
from common.layout import RunDir, eval_result
from common.shards import unigram_entropy
from training import checkpoint as ck
from training.metrics import read_metrics


def summarize(run_dir: str) -> dict[str, Any]:
    run = RunDir(run_dir)
    metrics = read_metrics(run_dir)
    if not metrics or not store.exists(run.config):
        raise BadInput(f"{run_dir} has no metrics.jsonl or config.json: not a run directory (yet)")
    config = store.read_json(run.config)
    val = [m for m in metrics if "val_loss" in m]
    out: dict[str, Any] = {
        "run_dir": run_dir,
        "step": metrics[-1]["step"] + 1,
        "max_steps": config["train"]["max_steps"],
        "train_loss": metrics[-1]["loss"],
        "first_val_loss": val[0]["val_loss"] if val else None,
        "val_loss": val[-1]["val_loss"] if val else None,
        "unigram_entropy": unigram_entropy(config["data"]["data_url"]),
        "checkpoints": [],
    }
    for c in sorted(ck.valid_checkpoints(run_dir), key=lambda c: c.step):
        row: dict[str, Any] = {"step": c.step, "checkpoint": c.url}
        if store.exists(eval_result(c.url, "hellaswag")):
            r = store.read_json(eval_result(c.url, "hellaswag"))
            row["ours_acc_norm"] = r["acc_norm"]
            row["data"] = r.get("key", {}).get("data")
        if store.exists(eval_result(c.url, "lm_eval")):
            for task, m in store.read_json(eval_result(c.url, "lm_eval"))["tasks"].items():
                row[f"lm_eval_{task}_acc_norm"] = m.get("acc_norm", m.get("acc"))
        out["checkpoints"].append(row)
    scored = [r for r in out["checkpoints"] if "ours_acc_norm" in r]
    out["best"] = max(scored, key=lambda r: r["ours_acc_norm"]) if scored else None
    if store.exists(run.samples):
        lines = store.read_bytes(run.samples).decode().splitlines()
        out["samples"] = json.loads(lines[-1]) if lines else None
    return out


def render(s: dict[str, Any]) -> str:
    lines = [f"{s['run_dir']}: step {s['step']}/{s['max_steps']}, train loss {s['train_loss']:.2f}"]
    if s["val_loss"] is not None:
        lines.append(
            f"val loss {s['val_loss']:.2f} nats (from {s['first_val_loss']:.2f} at the start) vs "
            f"{s['unigram_entropy']:.2f} nats unigram entropy of its data"
        )
    for r in s["checkpoints"]:
        evals = ", ".join(
            f"{k.removesuffix('_acc_norm').replace('_', ' ')} {v:.3f}"
            for k, v in r.items()
            if k.endswith("acc_norm") and v is not None
        )
        lines.append(f"  step {r['step']:>6}: {evals or 'not evaluated'}")
    if s["checkpoints"] and any("ours_acc_norm" in r for r in s["checkpoints"]):
        lines.append("  (acc_norm; chance is 0.25)")
    if s["best"]:
        lines.append(
            f"best checkpoint: step {s['best']['step']} (acc_norm {s['best']['ours_acc_norm']:.3f}), "
            f"{s['best']['checkpoint']}"
        )
    if s.get("samples"):
        lines.append(f"samples at step {s['samples']['step']}:")
        lines += [f"  > {t!r}" for t in s["samples"]["samples"]]
    return "\n".join(lines)


@entry_point
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m evaluation.summary", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("run_dir", help="run directory (fsspec URL)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)
    s = summarize(args.run_dir)
    print(json.dumps(s, indent=2) if args.json else render(s))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
