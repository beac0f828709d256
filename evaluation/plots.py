"""Curves a person would rather look at than read: train/val loss per step, and HellaSwag per checkpoint with
the GPT-2 124M (0.2955) and GPT-3 125M (0.337) reference lines, as in build-nanogpt's final plot.

    python -m evaluation.plots RUN_URL [--out curves.png]
"""

from __future__ import annotations

import argparse
import io

from common import store
from common.cli import entry_point
from common.errors import BadInput
from common.layout import RunDir, eval_result
from evaluation.hellaswag import GPT2_124M_ACC_NORM, GPT3_125M_ACC
from training import checkpoint as ck
from training.metrics import read_metrics


def read_hellaswag(run_dir: str) -> list[tuple[int, float]]:
    """(step, acc_norm) of every valid checkpoint evaluated by our HellaSwag scorer."""
    return [(step, acc) for step, acc, _ in _hellaswag_results(run_dir)]


def _hellaswag_results(run_dir: str) -> list[tuple[int, float, str]]:
    points = []
    for c in ck.valid_checkpoints(run_dir):
        url = eval_result(c.url, "hellaswag")
        if store.exists(url):
            r = store.read_json(url)
            points.append(
                (c.step, float(r["acc_norm"]), str((r.get("key") or {}).get("data") or ""))
            )
    return sorted(points)


def render_png(run_dir: str, title: str | None = None) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # no display on login or compute nodes
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    results = _hellaswag_results(run_dir)
    hella = [(step, acc) for step, acc, _ in results]
    # Real HellaSwag gets the published reference lines; another file in its format (the demo's task) its name.
    data = results[-1][2] if results else ""
    real = not data or data.endswith("hellaswag_val.jsonl")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    if rows:
        ax1.plot(
            [r["step"] for r in rows],
            [r["loss"] for r in rows],
            lw=0.8,
            alpha=0.8,
            label="train loss",
        )
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        if val:
            ax1.plot(*zip(*val), "o-", ms=3, label="val loss")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.set_title("loss")
    ax1.grid(alpha=0.3)
    ax1.legend(loc="upper right")
    if hella:
        ax2.plot(*zip(*hella), "o-", ms=3, label="ours (acc_norm)")
    ax2.axhline(0.25, color="tab:gray", ls=":", label="chance (0.25)")
    if real:
        ax2.axhline(
            GPT2_124M_ACC_NORM, color="tab:red", ls="--", label=f"GPT-2 124M ({GPT2_124M_ACC_NORM})"
        )
        ax2.axhline(
            GPT3_125M_ACC, color="tab:green", ls="--", label=f"GPT-3 125M ({GPT3_125M_ACC})"
        )
    ax2.set_xlabel("step")
    ax2.set_title(
        "HellaSwag" if real else f"{data.rsplit('/', 1)[-1].rsplit('.', 1)[0]} (HellaSwag format)"
    )
    ax2.grid(alpha=0.3)
    ax2.legend(loc="lower right")
    fig.suptitle(title or run_dir)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def render_trials_png(curves: dict[str, list[tuple[int, float]]], title: str) -> bytes:
    """Several runs' val loss on one axis (a sweep's trials): one line per run, labelled with its name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, points in sorted(curves.items()):
        steps, vals = zip(*points, strict=True)
        ax.plot(steps, vals, marker=".", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("val loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


@entry_point
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m evaluation.plots", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("run_dir", help="run directory (fsspec URL)")
    ap.add_argument("--out", default=None, help="PNG path or URL (default: {run_dir}/curves.png)")
    args = ap.parse_args(argv)
    if not read_metrics(args.run_dir):
        raise BadInput(f"{args.run_dir} has no metrics.jsonl yet")
    out = args.out or RunDir(args.run_dir).curves
    store.write_bytes(out, render_png(args.run_dir))
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
