"""What checkpointing costs the training loop: synchronous writes (every rank waits for the store) against
asynchronous ones (a snapshot in host memory, written by a background thread while the next steps run), and
the same run without checkpoints as the anchor, side by side.

    python bench/checkpoint_overhead.py                        # demo preset, a checkpoint every 10 steps
    python bench/checkpoint_overhead.py --config gpt2-124m --set micro_batch=1 --set seq_len=64 --steps 12 \
        --checkpoint-every 4                                   # the 124M's 1.5 GB checkpoints, on this CPU
    python bench/checkpoint_overhead.py --render FILE          # the markdown table

Each variant is `python -m training.train` on seeded random token shards into a fresh run directory (under
`--work`, or an fsspec URL such as s3://bucket/prefix: the store the checkpoints go to). From its metrics:
- step: the median `step_ms` of the steps (the optimizer step alone);
- blocked per checkpoint: `ckpt_block_s`, what each checkpoint held the loop up (the snapshot, and for the
  synchronous variant the whole write);
- write per checkpoint: `ckpt_write_s`, from the snapshot to the manifest (the checkpoint's time to durable);
- blocked / training: the blocked time over the training time, at this cadence (the figure to keep under 1%);
- loop: the steps plus the blocked time, against the same steps with no checkpoint at all (the anchor): what
  the writes cost besides blocking, e.g. a background writer competing with training for a CPU's cores.
The last step's checkpoint always waits for its write (the process leaves after it) and is left out.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cpu_run import cell, measured_on, random_shards, render, report

VARIANTS = {"no checkpoints": None, "synchronous": "false", "asynchronous": "true"}


def run_variant(a: argparse.Namespace, data: str, run_dir: str, async_write: str | None) -> dict:
    every = (
        a.checkpoint_every if async_write else 10 * a.steps
    )  # none: only the last step's, left out below
    sets = [
        f"run_dir={run_dir}",
        f"data_url={data}",
        f"max_steps={a.steps}",
        f"checkpoint_every={every}",
        f"checkpoint.async_write={async_write or 'false'}",
        "sample_every=0",
        f"val_every={10 * a.steps}",
        f"keep_last={a.steps}",
        "train.heartbeat_seconds=0",
        *a.set,
    ]
    cmd = [
        sys.executable,
        "-m",
        "training.train",
        "--config",
        a.config,
        *[x for kv in sets for x in ("--set", kv)],
    ]
    t0 = time.perf_counter()
    p = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1")
    )
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"training failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    from training.metrics import read_metrics

    m = read_metrics(run_dir)
    blocks = [r["ckpt_block_s"] for r in m if "ckpt_block_s" in r]
    writes = [r["ckpt_write_s"] for r in m if "ckpt_write_s" in r]
    train_s = sum(r["step_ms"] for r in m) / 1000
    return {
        "wall_s": wall,
        "steps": len(m),
        "step_ms": statistics.median(r["step_ms"] for r in m),
        "train_s": train_s,
        "checkpoints": len(blocks),
        "block_s": blocks,
        "write_s": writes,
        "loop_s": train_s + sum(blocks),
        "overhead": sum(blocks) / train_s if train_s else None,
    }


def summary(rows: list[dict]) -> list[dict]:
    out = []
    for name in VARIANTS:
        rs = [r for r in rows if r["variant"] == name]
        blocks = [b for r in rs for b in r["block_s"]]
        writes = [w for r in rs for w in r["write_s"]]
        out.append(
            {
                "variant": name,
                "runs": len(rs),
                "step_ms": statistics.median(r["step_ms"] for r in rs),
                "block_s": statistics.median(blocks) if blocks else None,
                "write_s": statistics.median(writes) if writes else None,
                "overhead": statistics.median(r["overhead"] for r in rs),
                "loop_s": statistics.median(r["loop_s"] for r in rs),
                "wall_s": statistics.median(r["wall_s"] for r in rs),
            }
        )
    base = out[0]["loop_s"]  # the same steps without checkpoints: the anchor
    for r in out:
        r["vs_none"] = r["loop_s"] / base - 1 if base else None
    return out


def table(res: dict) -> str:
    lines = [
        "| variant | step ms | blocked per checkpoint s | write per checkpoint s | blocked / training | "
        "loop s | loop vs no checkpoints |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["summary"]:
        lines.append(
            f"| {r['variant']} | {r['step_ms']:.1f} | {cell(r['block_s'], '.3f')} | "
            f"{cell(r['write_s'], '.3f')} | {100 * r['overhead']:.2f}% | {r['loop_s']:.1f} | "
            f"{100 * r['vs_none']:+.1f}% |"
        )
    st = res["settings"]
    sets = "".join(f" --set {kv}" for kv in st["set"])
    lines += [
        "",
        f"{st['config']}{sets}, {st['steps']} steps, a checkpoint every "
        f"{st['checkpoint_every']} ({st['checkpoint_mb']:.0f} MB each) into {st['store']}; median of "
        f"{st['repeat']} run(s) per variant.",
        "",
        measured_on(res),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python bench/checkpoint_overhead.py", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--config", default="demo")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="more training overrides"
    )
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--checkpoint-every", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument(
        "--work",
        help="where the data and run directories go (a folder or an fsspec URL); "
        "default: a temporary folder",
    )
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument(
        "--render", metavar="FILE", help="print the markdown table of a results file and exit"
    )
    a = ap.parse_args(argv)
    if a.render:
        return render(a.render, table)
    with tempfile.TemporaryDirectory() as tmp:
        data = random_shards(
            Path(tmp) / "data", (1 << 17, 1 << 20)
        )  # val: one B=64, T=1024 step + 1
        work = (a.work or tmp).rstrip("/")
        rows = []
        for i in range(a.repeat):
            for (
                name,
                flag,
            ) in VARIANTS.items():  # interleaved: drift on a shared machine hits both alike
                r = run_variant(a, data, f"{work}/runs/{name.replace(' ', '-')}-{i}", flag)
                rows.append({"variant": name, "repeat": i, **r})
                print(
                    f"  {name} #{i + 1}: step {r['step_ms']:.1f} ms, blocked {sum(r['block_s']):.2f} s over "
                    f"{r['checkpoints']} checkpoints, overhead {100 * r['overhead']:.2f}%",
                    flush=True,
                )
        from training.checkpoint import latest_checkpoint

        ckpt = latest_checkpoint(f"{work}/runs/asynchronous-0")  # its size, for the table's caption
        mb = sum(f["bytes"] for f in ckpt.manifest["files"].values()) / 1e6 if ckpt else 0.0
    settings = {
        "config": a.config,
        "set": a.set,
        "steps": a.steps,
        "checkpoint_every": a.checkpoint_every,
        "repeat": a.repeat,
        "store": "local disk" if not a.work or "://" not in a.work else a.work.split("://")[0],
        "checkpoint_mb": mb,
    }
    return report(settings, rows, summary(rows), table, a.out)


if __name__ == "__main__":
    raise SystemExit(main())
