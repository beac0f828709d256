"""Goodput at 64, 512 and 4096 GPUs, on paper: the constants this project measured, published failure rates.

    python bench/goodput_at_scale.py                    # reads the measured constants from bench/results/
    python bench/goodput_at_scale.py --restart-s 300    # another restart cost (what a bigger job pays)

The model (Young/Daly's): a job of N GPUs is interrupted at rate N x r (r per GPU-hour, from a published
campaign); it checkpoints every tau seconds, each checkpoint stalling training c seconds; every interruption
costs its detection d, its restart R (resubmission, job start, process and GPU start-up, compile, checkpoint
load) and, on average, half an interval of steps redone. Goodput, the share of wall time whose steps survive:

    G(tau) = tau / (tau + c) * (1 - N r (d + R + (tau + c) / 2))

maximised over tau (Young's tau* = sqrt(2 c / (N r)) to first order; here by search). The constants:

- r: Llama 3's pre-training, 419 unexpected interruptions in 54 days on 16,384 H100 GPUs (Meta, "The Llama 3
  Herd of Models", 2024: >90% effective training time). NVIDIA states <1% hardware downtime for runs of 2K-10K
  GPUs on DGX Cloud ("Ensuring Reliable Model Training on NVIDIA DGX Cloud", 2025) with in-job restarts.
- d: a crash (a rank's error, a lost node) as measured by bench/fault_recovery.py on Slurm; a hang as the hang
  rules' window (max(20 x step, floor 300 s by default)) plus the heartbeat check period.
- R: the measured resubmission-to-first-step of the tiny run on Slurm (job start, resume), plus the H100's
  first step of the 124M model (CUDA start-up and torch.compile, bench/train_throughput.py) and a checkpoint
  load taken as long as its write (bench/checkpoint_overhead.py).
- c: the asynchronous checkpoint's stall of the 124M model on an H100 (bench/checkpoint_overhead.py).

What it leaves out, and so flatters: a job at 4096 GPUs starts slower than one node (scheduling, NCCL at
scale), a bigger model's checkpoint takes longer to write and load, and some interruptions need a person. The
`--restart-s` row shows what a slower restart costs.
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

LLAMA3_INTERRUPTIONS, LLAMA3_DAYS, LLAMA3_GPUS = 419, 54, 16384
RATE_PER_GPU_S = LLAMA3_INTERRUPTIONS / (LLAMA3_DAYS * 86400 * LLAMA3_GPUS)
HANG_FLOOR_S, HANG_CHECK_S = 300.0, 10.0


def newest(pattern: str) -> dict:
    paths = sorted(glob.glob(str(RESULTS / pattern)))
    if not paths:
        raise SystemExit(f"no {pattern} in {RESULTS}: run the benchmark first")
    return json.loads(Path(paths[-1]).read_text()) | {"_file": Path(paths[-1]).name}


def measured() -> dict:
    """The constants, each with the result file it comes from."""
    faults = newest("fault_recovery-*-slurm.json")
    by = {s["fault"]: s for s in faults["summary"]}
    ckpt = newest("checkpoint_overhead-*-h100-124m.json")
    rows = {s["variant"]: s for s in ckpt["summary"]}
    tput = newest("train_throughput-*-h100.json")
    first = next(r["first_step_s"] for r in tput["rows"] if r.get("first_step_s"))
    step_s = next(r["ms_per_step"] for r in tput["rows"] if r.get("ms_per_step")) / 1000
    return {
        "crash_detect_s": by["killed"]["detected_s"]["median"],
        "resume_s": by["killed"]["first_new_step_s"]["median"],
        "gpu_start_s": first,
        "load_s": rows["synchronous"]["write_s"],
        "stall_s": rows["asynchronous"]["block_s"],
        "step_s": step_s,
        "sources": [faults["_file"], ckpt["_file"], tput["_file"]],
    }


def goodput(n_gpus: int, tau: float, c: float, lost_s: float) -> float:
    rate = n_gpus * RATE_PER_GPU_S
    return tau / (tau + c) * (1 - rate * (lost_s + (tau + c) / 2))


def best(n_gpus: int, c: float, lost_s: float) -> tuple[float, float]:
    """(tau, goodput) at the interval that maximises it (a log-spaced search, 1 s to 10 days)."""
    taus = [10 ** (k / 200) for k in range(0, 1200)]
    return max(((t, goodput(n_gpus, t, c, lost_s)) for t in taus), key=lambda x: x[1])


def model(m: dict, restart_s: float | None, scales: list[int]) -> list[dict]:
    restart = restart_s if restart_s is not None else m["resume_s"] + m["gpu_start_s"] + m["load_s"]
    hang_detect = max(20 * m["step_s"], HANG_FLOOR_S) + HANG_CHECK_S
    rows = []
    for kind, detect in (("crash", m["crash_detect_s"]), ("hang", hang_detect)):
        for n in scales:
            mtbf_h = 1 / (n * RATE_PER_GPU_S) / 3600
            tau, g = best(n, m["stall_s"], detect + restart)
            fixed = goodput(n, 1800, m["stall_s"], detect + restart)  # every 30 min, a common habit
            rows.append(
                {
                    "failures": kind,
                    "gpus": n,
                    "mtbf_h": round(mtbf_h, 1),
                    "detect_s": round(detect, 1),
                    "restart_s": round(restart, 1),
                    "best_interval_s": round(tau),
                    "goodput": round(g, 4),
                    "goodput_30min": round(fixed, 4),
                }
            )
    return rows


def table(rows: list[dict]) -> str:
    out = [
        "| failures | GPUs | MTBF | detect | restart | best checkpoint interval | goodput | goodput, every 30 min |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        out.append(
            f"| {r['failures']} | {r['gpus']} | {r['mtbf_h']} h | {r['detect_s']} s | {r['restart_s']} s | "
            f"{r['best_interval_s']} s | {r['goodput']:.1%} | {r['goodput_30min']:.1%} |"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--restart-s", type=float, help="a restart cost in place of the measured one")
    ap.add_argument("--gpus", default="64,512,4096,16384")
    ap.add_argument("--out", help="write the rows and constants here (JSON)")
    a = ap.parse_args(argv)
    m = measured()
    scales = [int(x) for x in a.gpus.split(",")]
    rows = model(m, a.restart_s, scales)
    print(
        f"interruptions: {RATE_PER_GPU_S * 3600:.3g} per GPU-hour (Llama 3: 419 in 54 days, 16,384 GPUs)"
    )
    print(
        f"measured: crash detected in {m['crash_detect_s']:.1f} s, resumed in {m['resume_s']:.1f} s, GPU "
        f"start-up {m['gpu_start_s']:.1f} s, checkpoint load {m['load_s']:.1f} s, stall {m['stall_s']:.2f} s "
        f"({', '.join(m['sources'])})"
    )
    print(table(rows))
    if a.out:
        Path(a.out).write_text(json.dumps({"constants": m, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
