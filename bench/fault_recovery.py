"""Fault recovery of the pretrain flow: real faults against real training runs that the real flow drives.

    python bench/fault_recovery.py                                 # frozen + killed, 3 runs each: ~3 min
    python bench/fault_recovery.py --faults killed --repeat 1 --max-steps 8 --checkpoint-every 3   # smoke
    python bench/fault_recovery.py --executor slurm                # jobs on a Slurm cluster's nodes (debug)
    python bench/fault_recovery.py --render bench/results/fault_recovery-X.json   # the markdown table

Each run is `python -m flows.pretrain` (the flow as a user starts it) against a Prefect server this script
starts on a free port (or `--api-url`), training the tiny preset on seeded random token shards (or `--data`).
Once the first checkpoint is written and the run is `--fault-at` steps in (by default mid-way to the next
checkpoint, where a fault at a random moment lands on average), the script injects the fault from outside,
finding the training process through its heartbeat ({run}/heartbeats/rank-00000.json):

- frozen: SIGSTOP (the process group locally; the rank's process on Slurm). Alive but silent: only the
  heartbeats, which stop changing, can tell; the flow must notice within its hang window and cancel the job.
- killed: SIGKILL (the process group locally; every process of the job on Slurm): a crash, seen at the next
  poll (on Slurm, once submitit has given up waiting for the result file the job never wrote).

Per fault it reports:

- detected after: from the signal to the flow's record of the submission's end (submissions.jsonl `time`),
  next to the configured hang window (max(hang_factor x median step time, hang_floor_s)), how often the flow
  reads heartbeats (min(10 s, floor / 4), on a poll) and its poll interval, and the bounds these imply;
- first new step after: from that record to the first step the next submission logs (metrics.jsonl, watched
  every 20 ms): the backoff, a new process (or job), and the resume from the checkpoint;
- steps redone: steps trained before the fault that the next submission trained again (those after the last
  checkpoint); steps lost: steps of 1..max_steps missing from the final metrics (must be 0).

With --repeat N each figure is the median (min-max) of N runs. The script exits 1 when a run did not recover
or lost a step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cpu_run import cpu_machine, random_shards

FAULTS = ("frozen", "killed")


# ----------------------------------------------------------------------------- what each run needs


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_prefect_server(home: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """`prefect server start` on `port` (default: a free one) with its own PREFECT_HOME (SQLite there, so a
    server started again on the same home and port has the same runs); returns it and its API URL."""
    port = free_port() if port is None else port
    api = f"http://127.0.0.1:{port}/api"
    env = dict(
        os.environ,
        PREFECT_HOME=str(home),
        PREFECT_API_URL=api,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    with open(home / "server.log", "ab") as log:
        server = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "prefect"),
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(f"{api}/health", timeout=2)
            return server, api
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                stop_group(server)
                raise RuntimeError(
                    "prefect server did not start:\n" + (home / "server.log").read_text()[-3000:]
                ) from None
            time.sleep(0.25)


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def overrides(a: argparse.Namespace) -> list[str]:
    """The tiny preset at ~30 ms steps on 2 CPU cores; a validation at every checkpoint, as a real run has."""
    return [
        "micro_batch=2",
        "seq_len=32",
        "total_batch_tokens=128",
        f"max_steps={a.max_steps}",
        "warmup_steps=2",
        f"val_every={a.checkpoint_every}",
        "val_tokens=64",
        "sample_every=0",
        f"checkpoint_every={a.checkpoint_every}",
        "log_every=1",
        f"train.heartbeat_seconds={a.heartbeat_seconds}",
        *a.set,
    ]


def flow_params(a: argparse.Namespace, store: Path, run_name: str, data: str) -> dict:
    p = {
        "preset": "tiny",
        "store": str(store),
        "run_name": run_name,
        "data": data,
        "overrides": overrides(a),
        "evaluation": {"tasks": []},
        "executor": a.executor,
        "poll_seconds": a.poll_seconds,
        "resubmission": {"backoff_seconds": a.backoff_seconds},
        "hang": {
            "floor_s": a.hang_floor,
            "factor": a.hang_factor,
            "startup_timeout_s": a.startup_timeout,
        },
    }
    if a.executor == "slurm":
        # time_min=20: below ~10 min submitit takes any signal for the time limit
        p["slurm"] = {
            "nodes": 1,
            "time_min": 20,
            "partition": a.partition,
            "folder": str(store.parent / "slurm"),
            "job_name": f"fault-bench-{run_name}",
        }
    return p


# ----------------------------------------------------------------------------- watching a run from outside


def read_lines(path: Path) -> list[dict]:
    try:
        return parse_lines(path.read_text())
    except OSError:
        return []


def parse_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # torn by a killed writer
    return out


class MetricsWatch(threading.Thread):
    """Every change of metrics.jsonl as (time, inode, last step). A resumed submission rewrites the file (a new
    inode) keeping the steps before its checkpoint, then appends: its first new step is the first line past
    the checkpoint in a file the faulted process never wrote."""

    def __init__(self, path: Path, every_s: float = 0.02):
        super().__init__(daemon=True)
        self.path, self.every_s = path, every_s
        self.seen: list[tuple[float, int, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        last = None
        while not self.done.is_set():
            try:
                with open(
                    self.path
                ) as f:  # the inode of what is read, even if the file is replaced meanwhile
                    st = os.fstat(f.fileno())
                    if (st.st_ino, st.st_size) != last:
                        last = (st.st_ino, st.st_size)
                        rows = parse_lines(f.read())
                        if rows:
                            self.seen.append((time.time(), st.st_ino, rows[-1]["step"]))
            except (OSError, KeyError):
                pass
            time.sleep(self.every_s)

    def first_step_at_or_after(self, step: int, not_inode: int) -> float | None:
        return next((t for t, ino, s in self.seen if ino != not_inode and s >= step), None)


def wait_for(cond, timeout: float, what: str, flow: subprocess.Popen, every_s: float = 0.01):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = cond()
        if got:
            return got
        if flow.poll() is not None:
            raise RuntimeError(f"the flow exited ({flow.returncode}) before {what}")
        time.sleep(every_s)
    raise TimeoutError(f"no {what} within {timeout:.0f} s")


def stopped_or_gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in (
            "T",
            "t",
            "Z",
            "X",
        )
    except (OSError, IndexError):
        return True


def inject(fault: str, executor: str, beat: dict, run: Path) -> list[int]:
    """The fault, as the outside world would deal it; returns the pids it stopped or killed."""
    sig = signal.SIGSTOP if fault == "frozen" else signal.SIGKILL
    if executor == "local":
        os.killpg(
            beat["pgid"], sig
        )  # the flow starts each local submission as its own process group
        return [beat["pid"]]
    if fault == "frozen":
        os.kill(beat["pid"], sig)  # the rank alone: its torchrun and the job's launcher stay alive
        return [beat["pid"]]
    # A node failure: every process of the job dies at once (scancel would let training checkpoint first).
    job = json.loads((run / "job.json").read_text())["job_id"]
    out = subprocess.run(["scontrol", "listpids", str(job)], capture_output=True, text=True).stdout
    pids = sorted(
        {
            int(ln.split()[0])
            for ln in out.splitlines()[1:]
            if ln.split() and ln.split()[0].isdigit()
        }
    )
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return pids


def cleanup(run: Path, executor: str) -> None:
    """A run cut short (an error, a timeout): end the submission still in flight, frozen ones included."""
    try:
        rec = json.loads((run / "job.json").read_text())
    except (OSError, ValueError):
        return
    job = str(rec.get("job_id", ""))
    if executor == "slurm" and job and not rec.get("ended"):
        subprocess.run(
            ["scancel", job], capture_output=True
        )  # SIGCONT, SIGTERM, then SIGKILL after KillWait
    elif job.startswith("local-"):
        try:
            os.killpg(int(job.removeprefix("local-")), signal.SIGKILL)
        except (ProcessLookupError, PermissionError, ValueError):
            pass


def run_one(
    a: argparse.Namespace, fault: str, number: int, work: Path, data: str, env: dict
) -> dict:
    store = work / f"{fault}-{number}"
    run_name = f"{fault}-{number}"
    run = store / "runs" / run_name
    params = flow_params(a, store, run_name, data)
    watch = MetricsWatch(run / "metrics.jsonl")
    watch.start()
    log_path = work / f"{run_name}.flow.log"
    with open(log_path, "wb") as log:
        flow = subprocess.Popen(
            [sys.executable, "-m", "flows.pretrain", "--params", json.dumps(params)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    victims: list[int] = []
    try:
        ckpt = run / "checkpoints" / f"step_{a.checkpoint_every:06d}" / "manifest.json"
        metrics = run / "metrics.jsonl"

        def due():
            if not ckpt.exists() or len(read_lines(metrics)) < a.fault_at:
                return None
            try:
                beat = json.loads((run / "heartbeats" / "rank-00000.json").read_text())
            except (OSError, ValueError):
                return None
            return beat if beat.get("step") else None

        beat = wait_for(due, a.timeout, f"step {a.fault_at} after the first checkpoint", flow)
        victims = inject(fault, a.executor, beat, run)
        t_fault = time.time()
        wait_for(
            lambda: all(stopped_or_gone(p) for p in victims), 10, "the signal to take effect", flow
        )
        inode = metrics.stat().st_ino
        done_at_fault = (
            max(r["step"] for r in read_lines(metrics)) + 1
        )  # steps count from 0 in metrics.jsonl
        ckpt_at_fault = latest_checkpoint_step(run)
        rc = flow.wait(timeout=a.timeout)
        if rc != 0:
            raise RuntimeError(
                f"the flow failed (exit {rc}); its log: {log_path}\n"
                + log_path.read_text(errors="replace")[-3000:]
            )
    except BaseException:
        stop_group(flow, signal.SIGKILL)
        cleanup(run, a.executor)
        if a.executor == "local":
            for pid in victims:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        raise
    finally:
        time.sleep(0.05)
        watch.done.set()
    at_fault = {"time": t_fault, "done": done_at_fault, "checkpoint": ckpt_at_fault, "inode": inode}
    return _row(a, fault, number, run, beat, victims, watch, at_fault)


def _row(
    a: argparse.Namespace,
    fault: str,
    number: int,
    run: Path,
    beat: dict,
    victims: list[int],
    watch: MetricsWatch,
    at_fault: dict,
) -> dict:
    """One fault's line of the results: how it was found, how the run went on, what it cost."""
    subs = read_lines(run / "submissions.jsonl")
    first, nxt = subs[0], (subs[1] if len(subs) > 1 else None)
    steps = [r["step"] for r in read_lines(run / "metrics.jsonl")]
    t_new = watch.first_step_at_or_after(nxt["start_step"], at_fault["inode"]) if nxt else None
    step_s = beat.get("step_s") or 0.0
    t_fault, done_at_fault = at_fault["time"], at_fault["done"]
    return {
        "fault": fault,
        "executor": a.executor,
        "repeat": number,
        "submissions": [
            {
                k: s.get(k)
                for k in ("state", "reason", "start_step", "end_step", "next", "job_id", "cordoned")
            }
            for s in subs
        ],
        "faulted_host": beat.get("host"),
        "signalled_pids": victims,
        "detected_s": first["time"] - t_fault,
        "first_new_step_s": (t_new - first["time"]) if t_new is not None else None,
        "step_s": step_s,
        "window_s": max(a.hang_factor * step_s, a.hang_floor) if fault == "frozen" else None,
        "steps_done_at_fault": done_at_fault,
        "checkpoint_at_fault": at_fault["checkpoint"],
        "resumed_from": nxt["start_step"] if nxt else None,
        "steps_redone": max(0, done_at_fault - nxt["start_step"]) if nxt else None,
        "steps_lost": len(set(range(a.max_steps)) - set(steps)),
        "steps_logged_twice": len(steps) - len(set(steps)),
        "recovered": first["state"] in ("hung", "failed")
        and len(subs) == 2
        and subs[1]["state"] == "completed",
    }


def latest_checkpoint_step(run: Path) -> int:
    steps = [
        int(d.name[5:])
        for d in (run / "checkpoints").glob("step_*")
        if d.name[5:].isdigit() and (d / "manifest.json").exists()
    ]  # written last: until then, incomplete
    return max(steps, default=0)


# ----------------------------------------------------------------------------- the machine, the table


def machine() -> dict:
    import prefect

    return {**cpu_machine(), "prefect": prefect.__version__, "os": platform.platform()}


def check_period(settings: dict) -> float:
    """How often the flow reads heartbeats in effect: min(10 s, floor / 4), at the first poll after that."""
    every, poll = min(10.0, settings["hang_floor_s"] / 4), settings["poll_seconds"]
    return -(-every // poll) * poll


def result_wait_s() -> float:
    """How long submitit waits for a Slurm task's result file before calling the job unfinished (a slow shared
    filesystem's allowance): the flow reports a job killed outright only after it, once per node."""
    from submitit.core.core import Job

    return float(Job._results_timeout_s)


def expected(fault: str, settings: dict, window: float | None) -> tuple[float, float]:
    """Where the detection time should land. A hang: the detector's last sight of a new step is between one
    heartbeat before the fault and one heartbeat check after it, and it reports once the window has passed
    since, at a check: (window - heartbeat, window + 2 checks + a poll). An exit: by the next poll (on Slurm,
    after submitit's wait for the result file the killed job never wrote). On Slurm the record of a hang also
    waits for the job to end: its launchers kill the ranks, its step ends (cluster.submit's cancel, at most
    15 s), then scancel."""
    poll = settings["poll_seconds"]
    if fault == "frozen":
        ending = 15.0 if settings.get("executor") == "slurm" else 0.0
        return window - settings["heartbeat_seconds"], window + 2 * check_period(
            settings
        ) + poll + ending
    wait = settings.get("result_wait_s", 0.0)
    return (
        (wait, wait + 1 + poll) if wait else (0.0, poll)
    )  # submitit looks for the file every second


def summary(rows: list[dict], settings: dict) -> list[dict]:
    out = []
    for fault in dict.fromkeys(r["fault"] for r in rows):
        rs = [r for r in rows if r["fault"] == fault]

        def pick(key: str, rs=rs) -> list:
            return [r[key] for r in rs if r[key] is not None]

        window = statistics.median(pick("window_s")) if pick("window_s") else None
        out.append(
            {
                "fault": fault,
                "executor": rs[0]["executor"],
                "runs": len(rs),
                "recovered": sum(r["recovered"] for r in rs),
                "window_s": window,
                "expected_s": expected(fault, settings, window),
                **{
                    k: spread(pick(k))
                    for k in (
                        "detected_s",
                        "first_new_step_s",
                        "steps_redone",
                        "checkpoint_at_fault",
                        "resumed_from",
                    )
                },
                "steps_lost": max(r["steps_lost"] for r in rs),
                "steps_logged_twice": max(r["steps_logged_twice"] for r in rs),
            }
        )
    return out


def spread(xs: list[float]) -> dict | None:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)} if xs else None


def fmt(s: dict | None, digits: int = 1) -> str:
    if s is None:
        return "n/a"
    f = lambda x: f"{x:.{digits}f}"  # noqa: E731
    return (
        f(s["median"])
        if s["min"] == s["max"]
        else f"{f(s['median'])} ({f(s['min'])}-{f(s['max'])})"
    )


def table(res: dict, markdown: bool = False) -> str:
    st, m = res["settings"], res["machine"]
    head = [
        "fault",
        "detected after s",
        "expected s",
        "hang window s",
        "first new step after s",
        "checkpoint -> resumed from",
        "steps redone",
        "steps lost",
        "recovered",
    ]
    body = []
    for s in res["summary"]:
        lo, hi = s["expected_s"]
        body.append(
            [
                s["fault"],
                fmt(s["detected_s"]),
                f"{lo:.1f}-{hi:.1f}",
                f"{s['window_s']:.1f}" if s["window_s"] is not None else "-",
                fmt(s["first_new_step_s"]),
                f"{fmt(s['checkpoint_at_fault'], 0)} -> {fmt(s['resumed_from'], 0)}",
                fmt(s["steps_redone"], 0),
                str(s["steps_lost"]),
                f"{s['recovered']}/{s['runs']}",
            ]
        )
    where_run = (
        f"Slurm executor (1-node jobs, partition {st['partition']})"
        if st["executor"] == "slurm"
        else "local executor"
    )
    how = (
        f"{where_run}; tiny preset, {st['max_steps']} steps, checkpoint every "
        f"{st['checkpoint_every']}, fault after {st['fault_at']} steps; heartbeat {st['heartbeat_seconds']:g} s, "
        f"hang window max({st['hang_factor']:g} x step time, floor {st['hang_floor_s']:g} s), heartbeats read "
        f"every {check_period(st):g} s, poll {st['poll_seconds']:g} s, backoff {st['backoff_seconds']:g} s; "
        f"median (min-max) of {st['repeat']} run(s) per fault"
    )
    where = (
        f"{m['cpus']} x {m['cpu_model']}, torch {m['torch']}, prefect {m['prefect']}, "
        f"Python {m['python']}; {res['when']}"
    )
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines + ["", f"{how}.", "", f"Measured on {where}."])
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]

    def line(row):
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
        )

    return "\n".join([how, where, line(head), *map(line, body)])


# ----------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--faults", default=",".join(FAULTS), help=f"comma-separated, of {', '.join(FAULTS)}"
    )
    ap.add_argument("--executor", choices=("local", "slurm"), default="local")
    ap.add_argument("--partition", default="debug", help="Slurm partition (--executor slurm)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per fault (min / median / max)")
    ap.add_argument("--max-steps", type=int, default=40)
    ap.add_argument("--checkpoint-every", type=int, default=10)
    ap.add_argument(
        "--fault-at",
        type=int,
        default=None,
        help="steps done when the fault is dealt (default: mid-way between the first two checkpoints)",
    )
    ap.add_argument("--heartbeat-seconds", type=float, default=0.5)
    ap.add_argument("--hang-floor", type=float, default=5.0, help="the flow's hang_floor_s")
    ap.add_argument("--hang-factor", type=float, default=20.0, help="the flow's hang_factor")
    ap.add_argument(
        "--startup-timeout", type=float, default=120.0, help="the flow's startup_timeout_s"
    )
    ap.add_argument("--poll-seconds", type=float, default=0.5)
    ap.add_argument(
        "--backoff-seconds", type=float, default=0.0, help="the flow's wait before a resubmission"
    )
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="another training override"
    )
    ap.add_argument(
        "--data", default=None, help="token shards URL (default: random shards in the work folder)"
    )
    ap.add_argument(
        "--api-url", default=None, help="a running Prefect server's API (default: start one)"
    )
    ap.add_argument(
        "--work", default=None, help="folder for the runs (default: a temporary one, removed after)"
    )
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds one run may take")
    ap.add_argument(
        "--out",
        default=None,
        help="results JSON (default: bench/results/fault_recovery-<when>.json)",
    )
    ap.add_argument(
        "--render", metavar="JSON", help="print a results file as a markdown table and exit"
    )
    return ap


def _settings(a: argparse.Namespace, faults: list[str]) -> dict:
    """What the results say they were measured with."""
    return {
        "executor": a.executor,
        "faults": faults,
        "repeat": a.repeat,
        "preset": "tiny",
        "max_steps": a.max_steps,
        "checkpoint_every": a.checkpoint_every,
        "fault_at": a.fault_at,
        "heartbeat_seconds": a.heartbeat_seconds,
        "hang_floor_s": a.hang_floor,
        "hang_factor": a.hang_factor,
        "startup_timeout_s": a.startup_timeout,
        "poll_seconds": a.poll_seconds,
        "backoff_seconds": a.backoff_seconds,
        "overrides": overrides(a),
        **(
            {"partition": a.partition, "result_wait_s": result_wait_s()}
            if a.executor == "slurm"
            else {}
        ),
    }


def _run_all(a: argparse.Namespace, faults: list[str], res: dict, out: Path, work: Path) -> None:
    """Every fault `a.repeat` times, each row written to `out` as soon as it is measured."""
    server = None
    try:
        data = a.data or random_shards(work / "data", (4096, 16384, 16384))
        api = a.api_url
        if api is None:
            (work / "prefect").mkdir(exist_ok=True)
            server, api = start_prefect_server(work / "prefect")
        # one thread per process: the flow, the training and the Prefect server share a few cores
        env = dict(os.environ, PREFECT_API_URL=api, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        for number in range(1, a.repeat + 1):
            for fault in faults:
                row = run_one(a, fault, number, work, data, env)
                res["rows"].append(row)
                res["summary"] = summary(res["rows"], res["settings"])
                out.write_text(json.dumps(res, indent=2))  # a run cut short keeps what it measured
                new = row["first_new_step_s"]
                print(
                    f"  {fault} #{number}: detected after {row['detected_s']:.2f} s, first new step "
                    f"after {'n/a' if new is None else f'{new:.2f}'} s, steps redone "
                    f"{row['steps_redone']}, lost {row['steps_lost']}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        if server is not None:
            stop_group(server)
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    ap = _parser()
    a = ap.parse_args(argv)
    if a.render:
        print(table(json.loads(Path(a.render).read_text()), markdown=True))
        return 0
    faults = [f.strip() for f in a.faults.split(",") if f.strip()]
    if not faults or any(f not in FAULTS for f in faults):
        ap.error(f"--faults: of {', '.join(FAULTS)}")
    a.fault_at = a.fault_at or a.checkpoint_every + max(1, a.checkpoint_every // 2)
    if not a.checkpoint_every < a.fault_at < min(a.max_steps, 2 * a.checkpoint_every):
        ap.error(
            "--fault-at must fall after the first checkpoint and before the second (and the run's end)"
        )
    when = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(a.out or REPO / "bench" / "results" / f"fault_recovery-{when}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(a.work or tempfile.mkdtemp(prefix="fault-recovery-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    settings = _settings(a, faults)
    res = {"when": when, "machine": machine(), "settings": settings, "rows": [], "summary": []}
    _run_all(a, faults, res, out, work)
    print(table(res))
    print(f"results: {out}")
    return 0 if all(r["recovered"] and r["steps_lost"] == 0 for r in res["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
