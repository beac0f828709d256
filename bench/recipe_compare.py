"""The build-nanogpt recipe against the fast one: same data, same tokens, same seeds, side by side in one run.

    python bench/recipe_compare.py --data store/data/pydoc --scale demo --steps 600 --seeds 0,1,2
    python bench/recipe_compare.py --data store/data/pydoc --scale small --steps 1500 --seeds 0
    python bench/recipe_compare.py --render bench/results/recipe_compare-X.json
    python bench/recipe_compare.py --merge A.json B.json --out C.json   # the same comparison on more seeds

Each run is `python -m training.train` on the shards at `--data` (bench/prepare_docs.py makes a real-text
corpus this machine can get from Debian's documentation packages: `--packages python3.11-doc` is the
Python documentation alone, the corpus the results in bench/results/ were measured on), one after the other on
this machine. Scales: `demo` (configs/demo.toml: 3 layers of 64, ~3.4M parameters, most of them the embedding) and
`small` (6 layers of 256, ~17.6M) on a CPU; `gpt2-124m` on a GPU (`bash bench/gpu_node.sh recipes`: the presets
gpt2-124m and gpt2-124m-fast at a batch of 131k tokens, on the 22.5M-token corpus of every package). Recipes:

- `build-nanogpt`: the preset as it is (AdamW, cosine, learned positions, tied head, tanh-GELU);
- `fast`: the switches of `FAST` (Muon for the hidden matrices, a trapezoid schedule, rotary positions,
  QK-norm, ReLU^2, an untied head, zero-initialised projections, a logit soft-cap). Document-aligned rows
  (data.align_docs) are left out: each row starts at a document, so the rest of a document longer than a row
  is passed over, and the Python documentation's ~7,000-token documents in 128-token rows would leave 2% of
  the text to train on (the model memorises it: train loss 0.5, val loss rising);
- `--ablate`: the fast recipe less one switch at a time, to see what each is worth here;
- `--batch-warmup STEPS`: the fast recipe with the batch growing over its first STEPS steps as well;
- `--plus "KEY=VALUE ..."` (repeatable): the fast recipe with these overrides as well, a recipe each (e.g. the
  switches it leaves off: `--plus model.value_embeds=1 --plus model.unet_skips=true`).

Reported per recipe (mean over the seeds, and each seed in the JSON): the final val loss at equal tokens, the
val loss each recipe had reached when the faster-finishing one was done (equal wall time), the tokens the fast
recipe needed to reach build-nanogpt's final val loss (interpolated between validations; none if it never
did), and the median step time. Curves are plotted next to the results JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cpu_run import measured_on, render, report

# the fast recipe's switches, and the learning rates it trains at (Muon's for the hidden matrices; AdamW's for
# the embeddings, head, biases and gains)
FAST = {
    "optim.optimizer": "muon",
    "optim.schedule": "trapezoid",
    "model.pos_emb": "rope",
    "model.qk_norm": "true",
    "model.mlp_act": "relu2",
    "model.tie_embeddings": "false",
    "model.zero_init_proj": "true",
    "model.logit_softcap": "15",
}
# what switching one of them off means (the preset's value)
BASELINE_VALUE = {
    "optim.optimizer": "adamw",
    "optim.schedule": "cosine",
    "model.pos_emb": "learned",
    "model.qk_norm": "false",
    "model.mlp_act": "gelu",
    "model.tie_embeddings": "true",
    "model.zero_init_proj": "false",
    "model.logit_softcap": "0",
}


class Scale(NamedTuple):
    preset: str  # the config it starts from
    overrides: list[str]


SCALES = {
    "demo": Scale("demo", []),
    "small": Scale(
        "demo",
        ["model.n_layer=6", "model.n_head=4", "model.n_embd=256", "optim.max_lr=6e-3"],
    ),
    # GPT-2 124M on one GPU for a few minutes a recipe (bench/gpu_node.sh recipes): 2 micro-batches of 64 x 1024
    # a step, so that a few hundred steps see a few tens of millions of tokens (the documentation corpus is
    # 22.5M: about two passes); a warm-up as short as the run, and val batches the 200k-token val shard holds
    "gpt2-124m": Scale(
        "gpt2-124m",
        [
            "total_batch_tokens=131072",
            "micro_batch=64",
            "optim.warmup_steps=20",
            "val_tokens=131072",
            "keep_every=0",
        ],
    ),
}


def recipes(
    ablate: bool, batch_warmup: int = 0, plus: list[str] | None = None
) -> dict[str, list[str]]:
    fast = [f"{k}={v}" for k, v in FAST.items()]
    out = {"build-nanogpt": [], "fast": fast}
    if ablate:
        for key, off in BASELINE_VALUE.items():
            out[f"fast - {key.split('.')[-1]}"] = [
                f"{k}={off if k == key else v}" for k, v in FAST.items()
            ]
    if batch_warmup:
        out["fast + batch warm-up"] = [*fast, f"batch_warmup_steps={batch_warmup}"]
    for more in (
        plus or []
    ):  # "KEY=VALUE KEY=VALUE": one recipe, the fast one with these overrides too
        out[f"fast + {more}"] = [*fast, *more.split()]
    return out


def train(a: argparse.Namespace, work: Path, name: str, overrides: list[str], seed: int) -> dict:
    run = work / f"{name.replace(' ', '')}-seed{seed}"
    if run.exists():  # an interrupted run of an earlier comparison: start it over
        shutil.rmtree(run)
    sets = [
        f"run_dir={run}",
        f"data_url={a.data}",
        f"max_steps={a.steps}",
        f"train.seed={1337 + seed}",
        f"val_every={a.val_every}",
        "sample_every=0",
        f"checkpoint_every={a.steps}",
        "log_every=10",
        *SCALES[a.scale].overrides,
        *a.set,
        *overrides,
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), PYTHONUNBUFFERED="1")
    t0 = time.time()
    p = subprocess.run(
        [sys.executable, "-m", "training.train", "--config", SCALES[a.scale].preset]
        + [x for kv in sets for x in ("--set", kv)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    if p.returncode != 0:
        raise RuntimeError(f"{name} seed {seed} failed:\n{p.stderr[-3000:]}")
    return collected(run, name, seed, time.time() - t0, a.data)


def finished(run: Path, steps: int) -> bool:
    """Whether `run` trained to the end of this comparison's steps (a run of another length is not it)."""
    done = run / "result.json"
    if not done.exists():
        return False
    result = json.loads(done.read_text())
    return bool(result.get("complete")) and result.get("final_step") == steps


def whole_val(run: Path, data: str) -> float:
    """The run's final checkpoint's loss on the whole val split. The validations during training read a few
    batches and move by 0.1-0.3 between validations at the CPU scales; the whole split (200k tokens of the
    documentation corpus) leaves the seeds' own spread. Read on the GPU where there is one, under the run's own
    autocast. Kept in {run}/whole_val.json, so a run is evaluated once."""
    kept = run / "whole_val.json"
    if kept.exists():
        return json.loads(kept.read_text())["val_loss"]
    from contextlib import nullcontext
    from functools import partial

    import torch

    from common.shards import load_shard
    from training import checkpoint as ck
    from training.accel import autocast_dtype, pick_device
    from training.loader import ShardLoader
    from training.train import evaluate_val

    device = pick_device("auto")
    model, cfg, step = ck.load_model(str(run), device)
    t = cfg.train
    dtype = autocast_dtype(cfg, device)
    amp = nullcontext if dtype is None else partial(torch.autocast, device.type, dtype=dtype)
    loader = ShardLoader(data, "val", t.micro_batch, t.seq_len, prefetch=False)
    # the split's shards as the loader lists them (their manifest's counts, else the files themselves)
    tokens = sum(s.tokens if s.tokens is not None else len(load_shard(s)) for s in loader.shards)
    batches = (tokens - 1) // (t.micro_batch * t.seq_len)
    try:
        loss = evaluate_val(model, loader, batches, device, amp, t.loss_chunk)
    finally:
        loader.close()
    kept.write_text(
        json.dumps({"val_loss": loss, "step": step, "tokens": batches * t.micro_batch * t.seq_len})
    )
    return loss


def collected(
    run: Path, name: str, seed: int, wall_s: float | None = None, data: str | None = None
) -> dict:
    """One finished run's row: its val curve against tokens and against its own training time, and with
    `data`, its final loss on the whole val split."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    median_ms = statistics.median(r["step_ms"] for r in rows)
    elapsed, curve = 0.0, []
    # the training's own time: its steps (validation costs every recipe the same); the first step holds
    # torch.compile's compilation (a minute on a GPU), so it counts as a median step
    for i, r in enumerate(rows):
        elapsed += (median_ms if i == 0 else r["step_ms"]) / 1000
        if "val_loss" in r:
            curve.append((r["tokens_seen"], round(elapsed, 3), r["val_loss"]))
    return {
        "recipe": name,
        "seed": seed,
        "wall_s": None if wall_s is None else round(wall_s, 1),
        "step_ms": median_ms,
        "curve": curve,
        "final_val": curve[-1][2],
        **({"whole_val": round(whole_val(run, data), 5)} if data else {}),
    }


def at(curve: list, x: float, axis: int) -> float | None:
    """The val loss at `x` on the curve's `axis` (0 tokens, 1 seconds), linear between validations."""
    pts = [(c[axis], c[2]) for c in curve]
    if not pts or x < pts[0][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / max(x1 - x0, 1e-12)
    return pts[-1][1] if x >= pts[-1][0] else None


def tokens_to(curve: list, target: float) -> float | None:
    """The tokens at which the curve first reaches `target` (linear between validations), or None."""
    for (t0, _, v0), (t1, _, v1) in zip(curve, curve[1:], strict=False):
        if v1 <= target < v0:
            return t0 + (t1 - t0) * (v0 - target) / (v0 - v1)
    return curve[0][0] if curve and curve[0][2] <= target else None


def mean_of_all(values: list[float | None]) -> float | None:
    """The mean, or None when any seed lacks the figure (a curve that never reached it)."""
    known = [v for v in values if v is not None]
    return statistics.mean(known) if known and len(known) == len(values) else None


def summarise(rows: list[dict]) -> list[dict]:
    names = list(dict.fromkeys(r["recipe"] for r in rows))
    base = [r for r in rows if r["recipe"] == "build-nanogpt"]
    target = statistics.mean(r["final_val"] for r in base)
    base_tokens = statistics.mean(r["curve"][-1][0] for r in base)
    # a batch warm-up trains fewer tokens in the same steps: every recipe is also read at the fewest any reached
    fewest = min(r["curve"][-1][0] for r in rows)
    fast = [r for r in rows if r["recipe"] == "fast"]
    fast_target = statistics.mean(r["final_val"] for r in fast) if fast else None
    out = []
    for name in names:
        mine = [r for r in rows if r["recipe"] == name]
        wall = min(
            statistics.mean(r["curve"][-1][1] for r in base),
            statistics.mean(r["curve"][-1][1] for r in mine),
        )
        reach = mean_of_all([tokens_to(r["curve"], target) for r in mine])
        to_fast = [
            None if fast_target is None else tokens_to(r["curve"], fast_target) for r in mine
        ]
        out.append(
            {
                "recipe": name,
                "seeds": len(mine),
                "final_val": statistics.mean(r["final_val"] for r in mine),
                # on the whole val split (rows of older results files lack it)
                "whole_val": mean_of_all([r.get("whole_val") for r in mine]),
                "whole_val_spread": None
                if any(r.get("whole_val") is None for r in mine)
                else max(r["whole_val"] for r in mine) - min(r["whole_val"] for r in mine),
                "final_val_spread": max(r["final_val"] for r in mine)
                - min(r["final_val"] for r in mine),
                "tokens": statistics.mean(r["curve"][-1][0] for r in mine),
                "val_at_equal_tokens": mean_of_all([at(r["curve"], fewest, 0) for r in mine]),
                "equal_tokens": fewest,
                "val_at_equal_wall": mean_of_all([at(r["curve"], wall, 1) for r in mine]),
                "equal_wall_s": round(wall, 1),
                "tokens_to_baseline": reach,
                "token_ratio": None if reach is None else reach / base_tokens,
                # the tokens to the fast recipe's final val loss: what a change to the fast recipe saves
                "tokens_to_fast": mean_of_all(to_fast),
                "step_ms": statistics.median(r["step_ms"] for r in mine),
            }
        )
    return out


def table(res: dict) -> str:
    s = res["settings"]
    summary = res["summary"]
    # recipes that trained different tokens in the same steps (a batch warm-up) are also read at the fewest
    uneven = len({r.get("tokens") for r in summary}) > 1
    head = "| recipe | final val loss (equal tokens) | val loss at equal wall time | tokens to build-nanogpt's "
    head += "final val loss | step |"
    if uneven:
        head = (
            f"| recipe | tokens | final val loss | val loss at {summary[0]['equal_tokens']:,.0f} tokens | val "
            "loss at equal wall time | tokens to build-nanogpt's final val loss | tokens to the fast "
            "recipe's final val loss | step |"
        )
    # the final checkpoints on the whole val split, where the results have it
    whole = all(r.get("whole_val") is not None for r in summary)
    if whole:
        head = head.replace(" | val loss at", " | on the whole val split | val loss at", 1)
    lines = [
        f"scale {s['scale']}, {s['steps']} steps, seeds {s['seeds']}, data {s['data']}",
        "",
        head,
        "| --- |" + " ---: |" * (head.count("|") - 2),
    ]
    for r in summary:
        wall = (
            "-"
            if r["val_at_equal_wall"] is None
            else f"{r['val_at_equal_wall']:.4f} ({r['equal_wall_s']:.0f} s)"
        )
        reach = (
            "(the target)"
            if r["recipe"] == "build-nanogpt"
            else "never"
            if r["token_ratio"] is None
            else f"{r['tokens_to_baseline']:,.0f} ({r['token_ratio']:.2f}x)"
        )
        final = f"{r['final_val']:.4f} ± {r['final_val_spread'] / 2:.4f}"
        if whole:
            final += f" | {r['whole_val']:.4f} ± {r['whole_val_spread'] / 2:.4f}"
        if not uneven:
            lines.append(f"| {r['recipe']} | {final} | {wall} | {reach} | {r['step_ms']:.0f} ms |")
            continue
        to_fast = (
            "(the target)"
            if r["recipe"] == "fast"
            else "never"
            if r.get("tokens_to_fast") is None
            else f"{r['tokens_to_fast']:,.0f}"
        )
        lines.append(
            f"| {r['recipe']} | {r['tokens']:,.0f} | {final} | {r['val_at_equal_tokens']:.4f} | {wall} | "
            f"{reach} | {to_fast} | {r['step_ms']:.0f} ms |"
        )
    lines += ["", measured_on(res)]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(dict.fromkeys(r["recipe"] for r in res["rows"]))
    for i, name in enumerate(names):
        for j, r in enumerate(x for x in res["rows"] if x["recipe"] == name):
            toks, _, vals = zip(*r["curve"], strict=True)
            ax.plot(toks, vals, color=f"C{i}", alpha=0.8, label=name if j == 0 else None)
    ax.set_xlabel("tokens")
    ax.set_ylabel("val loss")
    ax.set_title(f"recipes at scale {res['settings']['scale']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="token shards (a data_prep output folder or URL)")
    ap.add_argument("--scale", choices=sorted(SCALES), default="demo")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--val-every", type=int, default=50)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--ablate", action="store_true", help="also the fast recipe less one switch at a time"
    )
    ap.add_argument(
        "--batch-warmup",
        type=int,
        default=0,
        metavar="STEPS",
        help="also the fast recipe with a batch-size warm-up over this many steps (it grows in whole "
        "micro-batches: give a micro_batch below the batch with --set)",
    )
    ap.add_argument(
        "--plus",
        action="append",
        default=[],
        metavar='"KEY=VALUE ..."',
        help="also the fast recipe with these overrides (space-separated), a recipe per --plus",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every recipe (e.g. micro_batch=2)",
    )
    ap.add_argument("--work", help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--out", help="results JSON (and its .png of the curves)")
    ap.add_argument("--render", help="print the table of a results JSON and exit")
    ap.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="train nothing: one comparison of results files measured alike on other seeds (with --out)",
    )
    ap.add_argument(
        "--collect",
        action="store_true",
        help="train nothing: compare the runs of --work that reached --steps (an interrupted comparison)",
    )
    return ap


# the settings that make two results one comparison (seeds, the work folder and the output aside)
ALIKE = ("data", "scale", "steps", "val_every", "threads", "ablate", "batch_warmup", "plus", "set")


def merge(ap: argparse.ArgumentParser, paths: list[str], out: str | None) -> int:
    """Results of the same comparison on other seeds, on the same machine, as one comparison."""
    parts = []
    for path in paths:
        try:
            res = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            ap.error(f"cannot read {path}: {err}")
        shape = {"settings": dict, "machine": dict, "rows": list}
        if not (isinstance(res, dict) and all(isinstance(res.get(k), t) for k, t in shape.items())):
            ap.error(f"{path} is not a results file of recipe_compare (settings, machine and rows)")
        parts.append(res)
    first = parts[0]
    for path, res in zip(paths[1:], parts[1:], strict=True):
        for key in ALIKE:  # a setting a file has not is its default (an older file's)
            mine, theirs = (x["settings"].get(key, ap.get_default(key)) for x in (res, first))
            if mine != theirs:
                ap.error(
                    f"{path} was measured with {key}={mine!r}, {paths[0]} with {theirs!r}: not one "
                    "comparison"
                )
        if res["machine"] != first["machine"]:
            ap.error(
                f"{path} was measured on another machine than {paths[0]}: step times would not compare"
            )
    rows = [r for res in parts for r in res["rows"]]
    runs = [(r["recipe"], r["seed"]) for r in rows]
    if len(set(runs)) != len(runs):
        ap.error("the files share a recipe and seed: merge results of other seeds")
    seeds = sorted({r["seed"] for r in rows})
    settings = dict(first["settings"], seeds=",".join(map(str, seeds)), out=out, merged=paths)
    code = report(settings, rows, summarise(rows), table, out)
    if out:
        plot(json.loads(Path(out).read_text()), Path(out).with_suffix(".png"))
    return code


def main(argv=None) -> int:
    ap = _parser()
    a = ap.parse_args(argv)
    if a.render:
        return render(a.render, table)
    if a.merge:
        return merge(ap, a.merge, a.out)
    if not a.data:
        ap.error("--data is required")
    seeds = [int(x) for x in a.seeds.split(",")]
    from training.config import ConfigError, load_config

    scale = SCALES[a.scale]
    for name, overrides in recipes(a.ablate, a.batch_warmup, a.plus).items():
        try:  # every recipe's config, before any trains: a bad --plus or --set is one line, nothing run
            load_config(scale.preset, [*scale.overrides, *a.set, *overrides])
        except ConfigError as err:
            ap.error(f"recipe {name!r}: {' '.join(str(err).split())}")
    work = Path(a.work or tempfile.mkdtemp(prefix="recipe-compare-"))
    rows = []
    # seeds outermost: an interrupted comparison still compares the recipes on the seeds it did (--collect)
    for seed in seeds:
        for name, overrides in recipes(a.ablate, a.batch_warmup, a.plus).items():
            run = work / f"{name.replace(' ', '')}-seed{seed}"
            if finished(
                run, a.steps
            ):  # a comparison run again in the same --work trains only what it lacks
                rows.append(collected(run, name, seed, data=a.data))
                print(f"  {name} seed {seed}: trained before", file=sys.stderr, flush=True)
                continue
            if a.collect:
                continue
            rows.append(train(a, work, name, overrides, seed))
            r = rows[-1]
            print(
                f"  {name} seed {seed}: val {r['final_val']:.4f}, {r['wall_s']:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    if a.collect:  # the seeds every recipe finished
        names = set(recipes(a.ablate, a.batch_warmup, a.plus))
        whole = [x for x in seeds if {r["recipe"] for r in rows if r["seed"] == x} == names]
        if not whole:
            ap.error(f"no seed in {work} that every recipe finished")
        rows = [r for r in rows if r["seed"] in whole]
        a.seeds = ",".join(map(str, whole))
    settings = {k: v for k, v in vars(a).items() if k not in ("render", "collect")}
    code = report(settings, rows, summarise(rows), table, a.out)
    if a.out:
        plot(json.loads(Path(a.out).read_text()), Path(a.out).with_suffix(".png"))
    return code


if __name__ == "__main__":
    sys.exit(main())
