"""A soak: one pretrain run on the local Slurm cluster meets fault after fault; its goodput measured.

    python bench/fault_soak.py                                   # ~20-30 min, a fault every 1-3 min
    python bench/fault_soak.py --steps 3000 --every 30:60        # a short one (~6 min)
    python bench/fault_soak.py --render bench/results/fault_soak-X.json

The run is the flow as a user starts it (`python -m flows.pretrain`, executor=slurm: one-node jobs on the
cluster's nodes n1/n2, cluster/local/slurm_cluster.sh) against a Prefect server this script starts, training the
tiny preset on seeded random token shards. Once it trains, faults drawn at random (seeded) from `--faults`:

  kill      SIGKILL of the rank: a crash, seen through its missing exit record
  freeze    SIGSTOP of the rank: a hang, seen only through its heartbeats
  node      the job's node set DOWN (Slurm ends the attempt NODE_FAIL and requeues it); RESUMEd 30-60 s later
  preempt   USR2 to the job, what Slurm sends before a preemption: checkpoint, requeue inside the job
  flow      the flow's process SIGKILLed, started again 5 s later: it must reattach to the job, not resubmit
  server    the Prefect server stopped for 20-40 s, then started again: the flow must ride it out
  store     the run's store cut off for 30-60 s (with --store s3: moto's S3 server behind a relay that accepts
            connections and answers nothing, bench/pausable_relay.py), then healed: the run must ride it out

Each fault comes `--every` seconds (drawn uniformly) after the run trained again from the previous one; no kind
comes again before every kind has come once. A requeued job is started as soon as its previous start is gone
from the node (Slurm's own 120 s hold is cluster policy, the same with or without us; the tests do the same).

Reported: goodput (the training time of the steps in the final trace, over the run's wall time, beside the
same figure for the same run in one plain process with no faults: its checkpoints, validation and start-up),
per fault its detection (the first record the system wrote of it: a submission's end, a requeue, a cordon, a
reattach, the flow's warning that the store does not answer) and recovery (the first new step) times and the
steps redone, and whether the final loss trace is the uninterrupted run's, bit for bit, with no step missing.
Exit 1 when it is not. With --store s3 the anchor run still writes to a local folder: the store's own cost is
in the soak's figure, not the anchor's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cpu_run import cpu_machine, random_shards
from fault_recovery import (
    MetricsWatch,
    free_port,
    parse_lines,
    read_lines,
    start_prefect_server,
    stop_group,
)
from pausable_relay import PausableRelay

FAULTS = ("kill", "freeze", "node", "preempt", "flow", "server", "store")
# how the flow says that the store does not answer: its watch's alarm while it lasts, its hang detector after
STORE_SAID = ("has not answered for", "the store did not answer", "the store answered again after")


class PrefectServer:
    """A Prefect server that can be stopped and started again on the same port and home, so that its database
    (SQLite) and the flow's API URL stay the same."""

    def __init__(self, home: Path):
        self.home, self.port = home, free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc, _ = start_prefect_server(self.home, self.port)

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)


class S3Store:
    """moto's S3 server (its own process) with a bucket, and a relay in front of it that the run goes through:
    the fault cuts the relay, while the soak reads the run's files from the server directly."""

    def __init__(self, work: Path):
        self.port = free_port()
        self.log = open(work / "moto.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.endpoint = f"http://127.0.0.1:{self.port}"
        creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
        self.fs = self._fs(creds)
        self.fs.mkdir("soak")
        self.relay = PausableRelay(("127.0.0.1", self.port)).start()
        self.env = {
            **creds,
            "FSSPEC_S3_ENDPOINT_URL": self.relay.url,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def _fs(self, creds: dict, timeout: float = 60):
        import s3fs

        deadline = time.time() + timeout
        while True:
            fs = s3fs.S3FileSystem(
                endpoint_url=self.endpoint,
                key=creds["AWS_ACCESS_KEY_ID"],
                secret=creds["AWS_SECRET_ACCESS_KEY"],
                skip_instance_cache=True,
            )
            try:
                fs.ls("")
                return fs
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)

    def stop(self) -> None:
        self.relay.stop()
        stop_group(self.proc)


class RunFiles:
    """The run's files as the soak reads them: on local disk, or on S3 from the server itself."""

    def __init__(self, fs, root: str, local: bool):
        self.fs, self.root, self.local = fs, root.rstrip("/"), local

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def text(self, name: str) -> str:
        return self.fs.cat_file(self.path(name)).decode()

    def lines(self, name: str) -> list[dict]:
        try:
            return parse_lines(self.text(name))
        except OSError:
            return []

    def latest_checkpoint(self) -> int:
        manifests = self.fs.glob(self.path("checkpoints/step_*/manifest.json"))
        return max(
            (int(m.rstrip("/").split("/")[-2].removeprefix("step_")) for m in manifests),
            default=0,
        )


class StoreMetricsWatch(threading.Thread):
    """MetricsWatch for a run on S3: every new version of metrics.jsonl as (time, ETag, last step), polled."""

    def __init__(self, files: RunFiles, every_s: float = 0.25):
        super().__init__(daemon=True)
        self.files, self.every_s = files, every_s
        self.seen: list[tuple[float, str, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        last = None
        while not self.done.is_set():
            try:
                tag = self.files.fs.info(self.files.path("metrics.jsonl"))["ETag"]
                if tag != last:
                    last = tag
                    rows = parse_lines(self.files.text("metrics.jsonl"))
                    if rows:
                        self.seen.append((time.time(), tag, rows[-1]["step"]))
            except (OSError, KeyError):
                pass
            time.sleep(self.every_s)


def slurm(*args: str) -> str:
    return subprocess.run(args, capture_output=True, text=True, timeout=60).stdout


class Soak:
    def __init__(
        self,
        a: argparse.Namespace,
        work: Path,
        data: str,
        server: PrefectServer,
        s3: S3Store | None = None,
    ):
        self.a, self.work, self.data, self.server, self.s3 = a, work, data, server, s3
        self.env = dict(os.environ, PREFECT_API_URL=server.api, OMP_NUM_THREADS="1")
        self.env["PYTHONUNBUFFERED"] = "1"
        self.watch: MetricsWatch | StoreMetricsWatch
        if s3 is None:
            import fsspec

            self.store = str(work / "store")
            self.files = RunFiles(fsspec.filesystem("file"), f"{self.store}/runs/soak", True)
            self.watch = MetricsWatch(Path(self.files.path("metrics.jsonl")))
        else:
            self.store = "s3://soak/store"
            self.files = RunFiles(s3.fs, "soak/store/runs/soak", False)
            self.env.update(s3.env)
            self.watch = StoreMetricsWatch(self.files)
        self.rng = random.Random(a.seed)
        self.flow: subprocess.Popen | None = None
        self.flow_starts = 0
        self.faults: list[dict] = []

    # ------------------------------------------------------------------ the run

    def params(self) -> dict:
        a = self.a
        return {
            "preset": "tiny",
            "store": self.store,
            "run_name": "soak",
            "data": self.data,
            "overrides": overrides(a),
            "evaluation": {"tasks": []},
            "executor": "slurm",
            "poll_seconds": 1.0,
            "resubmission": {
                "backoff_seconds": 2.0,
                "max_resubmits": 1000,
                "cordon_hours": a.cordon_s / 3600,
            },
            "hang": {"floor_s": a.hang_floor, "factor": 20.0, "startup_timeout_s": 120.0},
            "slurm": {
                "nodes": 1,
                "time_min": 60,
                "partition": "debug",
                "folder": str(self.work / "slurm"),
                "job_name": "soak",
            },
        }

    def start_flow(self) -> None:
        self.flow_starts += 1
        log = open(self.work / f"flow-{self.flow_starts}.log", "wb")
        cmd = [sys.executable, "-m", "flows.pretrain", "--params", json.dumps(self.params())]
        self.flow = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def last_step(self) -> int:
        return self.watch.seen[-1][2] if self.watch.seen else -1

    def training_again(self, since: float, timeout: float = 900) -> float | None:
        """When the run stepped again after `since` (a step line written later than it), or None."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            t = next((t for t, _ino, _s in self.watch.seen if t > since), None)
            if t is not None:
                return t
            if self.flow is not None and self.flow.poll() is not None:
                return None
            time.sleep(0.05)
        return None

    # ------------------------------------------------------------------ faults

    def job(self) -> str:
        return str(json.loads(self.files.text("job.json"))["job_id"])

    def beat(self) -> dict:
        return json.loads(self.files.text("heartbeats/rank-00000.json"))

    def inject(self, kind: str) -> dict:
        """The fault, dealt from outside as the world would; what it hit."""
        if kind in ("kill", "freeze"):
            beat = self.beat()
            os.kill(beat["pid"], signal.SIGKILL if kind == "kill" else signal.SIGSTOP)
            return {"host": beat["host"], "pid": beat["pid"]}
        if kind == "node":
            host, job = self.beat()["host"], self.job()
            slurm("scontrol", "update", f"NodeName={host}", "State=DOWN", "Reason=soak: node died")
            back = self.rng.uniform(30, 60)
            threading.Thread(target=self._node_back, args=(host, job, back), daemon=True).start()
            return {"host": host, "job": job, "down_s": round(back, 1)}
        if kind == "preempt":
            job = self.job()
            slurm("scancel", "--signal=USR2", job)
            threading.Thread(target=self._release, args=(job,), daemon=True).start()
            return {"job": job}
        if kind == "flow":
            assert self.flow is not None
            stop_group(self.flow, signal.SIGKILL)
            time.sleep(5)
            self.start_flow()
            return {"flow_start": self.flow_starts}
        if kind == "server":
            self.server.stop()
            down = self.rng.uniform(20, 40)
            time.sleep(down)
            self.server.start()
            return {"down_s": round(down, 1)}
        if kind == "store":
            if self.s3 is None:
                raise ValueError("the store fault needs --store s3")
            self.s3.relay.cut()
            down = self.rng.uniform(30, 60)
            time.sleep(down)
            self.s3.relay.heal()
            return {"down_s": round(down, 1)}
        raise ValueError(kind)

    def _node_back(self, host: str, job: str, after: float) -> None:
        self._release(job)
        time.sleep(max(0.0, after - 5))
        slurm("scontrol", "update", f"NodeName={host}", "State=RESUME")

    def _release(self, job: str, timeout: float = 120) -> None:
        """A requeued job: started once its previous start is gone from the node."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = slurm("squeue", "-h", "-j", job, "-o", "%T").strip()
            steps = slurm("squeue", "-h", "-s", "-j", job).strip()
            if state == "PENDING" and not steps:
                time.sleep(1)
                slurm("scontrol", "update", f"JobId={job}", "StartTime=now")
                return
            if not state:
                return  # ended instead (the flow resubmits)
            time.sleep(0.2)

    def detected(self, kind: str, at: float, timeout: float = 900) -> float | None:
        """When the system first wrote down the fault dealt at `at`: a submission's end, a requeue inside the
        job, a cordon (kill, freeze, node, preempt); the new flow's reattach (flow)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if kind == "flow":
                log = self.work / f"flow-{self.flow_starts}.log"
                if "reattached to job" in log.read_text(errors="replace"):
                    return time.time()  # polled: within 50 ms
            else:
                times = [
                    r.get("time")
                    for name in ("submissions.jsonl", "attempts.jsonl", "cordon.jsonl")
                    for r in self.files.lines(name)
                ]
                later = [t for t in times if isinstance(t, (int, float)) and t >= at]
                if later:
                    return min(later)
            if self.flow is not None and self.flow.poll() is not None:
                return None
            time.sleep(0.05)
        return None

    def said_in_flow_log(self, phrases: tuple[str, ...], at: float) -> float | None:
        """When the flow first logged one of `phrases` after `at` (by its log lines' own times)."""
        day = datetime.fromtimestamp(at).date()
        text = (self.work / f"flow-{self.flow_starts}.log").read_text(errors="replace")
        for line in text.splitlines():
            if not any(p in line for p in phrases):
                continue
            try:
                clock = datetime.strptime(line[:12], "%H:%M:%S.%f").time()
            except ValueError:
                continue
            t = datetime.combine(day, clock).timestamp()
            if t >= at:
                return t
        return None

    def resumed(self, at: float, pid: int | None, timeout: float = 900) -> float | None:
        """When a process other than `pid` (the one faulted; None: any process) had trained a step after `at`: a
        new start's first step, seen through rank 0's heartbeat (rewritten every 0.5 s and after each step)."""
        deadline, first = time.time() + timeout, {}
        while time.time() < deadline:
            try:
                beat = self.beat()
            except (OSError, ValueError):
                beat = {}
            who, step = beat.get("pid"), beat.get("step")
            if who not in (None, pid) and step is not None:
                first.setdefault(who, step)
                if step > first[who]:
                    return time.time()
            if self.flow is not None and self.flow.poll() is not None:
                return None
            time.sleep(0.02)
        return None

    # ------------------------------------------------------------------ the soak

    def go(self) -> dict:
        self.watch.start()
        t0 = time.time()
        self.start_flow()
        assert self.flow is not None
        kinds = [k for k in self.a.faults.split(",") if k]
        bag: list[str] = []
        lo, hi = self.a.every
        if self.training_again(t0) is None:
            raise RuntimeError("the run never trained: see " + str(self.work))
        while True:
            wait = self.rng.uniform(lo, hi)
            if self._ends_within(wait):
                break
            time.sleep(wait)
            if self.flow.poll() is not None or self.last_step() >= self.a.steps - 50:
                break
            if not bag:  # each kind once, in a seeded random order, before any repeats
                bag = self.rng.sample(kinds, len(kinds))
            kind = bag.pop()
            beat = (
                self.beat()
            )  # fresher than the metrics, which a run on S3 writes at checkpoints only
            step = max(self.last_step(), (beat.get("step") or 0) - 1)
            ckpt, pid = self.files.latest_checkpoint(), beat["pid"]
            at = time.time()
            hit = self.inject(kind)
            # the training itself stops (a store cut stops it at its next write, and it goes on where it was)
            stops = kind in ("kill", "freeze", "node", "preempt", "store")
            since = time.time() if kind == "flow" else at  # the new flow's start
            found = (
                self.said_in_flow_log(STORE_SAID, at)
                if kind == "store"
                else self.detected(kind, since)
                if kind != "server"
                else None
            )
            again = self.resumed(at, None if kind == "store" else pid) if stops else None
            redone = max(0, step + 1 - ckpt) if kind in ("kill", "freeze", "node") else 0
            rec = {
                "fault": kind,
                "at_s": round(at - t0, 1),
                "step": step,
                "hit": hit,
                "detected_s": None if found is None else round(found - since, 2),
                "training_again_s": None if again is None else round(again - at, 2),
                "steps_redone": redone,
                "flow_alive": self.flow.poll() is None,
            }
            self.faults.append(rec)
            print(f"  {json.dumps(rec)}", file=sys.stderr, flush=True)
            if (stops and again is None) or not rec["flow_alive"]:
                break
        rc = self.flow.wait(timeout=3600)
        wall = time.time() - t0
        time.sleep(0.1)
        self.watch.done.set()
        return {"flow_exit": rc, "wall_s": round(wall, 1)}

    def _ends_within(self, seconds: float) -> bool:
        """Whether the run will be done before a fault drawn `seconds` from now (by its pace)."""
        seen = self.watch.seen
        if len(seen) < 2:
            return False
        (t1, _, s1), (t2, _, s2) = seen[max(0, len(seen) - 50)], seen[-1]
        pace = (s2 - s1) / max(t2 - t1, 1e-6)
        return s2 + pace * seconds >= self.a.steps - 20


def overrides(a: argparse.Namespace) -> list[str]:
    return [
        "micro_batch=2",
        "seq_len=32",
        f"total_batch_tokens={a.batch_tokens}",
        f"max_steps={a.steps}",
        "warmup_steps=10",
        f"val_every={a.checkpoint_every}",
        "val_tokens=64",
        "sample_every=0",
        f"checkpoint_every={a.checkpoint_every}",
        "keep_last=3",
        "log_every=1",
        "train.heartbeat_seconds=0.5",
    ]


def reference(a: argparse.Namespace, work: Path, data: str, reuse: str | None) -> dict:
    """The same run in one plain process, no faults: the trace to match, and the goodput of no faults."""
    if reuse:
        return json.loads((Path(reuse) / "reference.json").read_text())
    run = work / "reference"
    sets = [
        x for kv in [f"run_dir={run}", f"data_url={data}", *overrides(a)] for x in ("--set", kv)
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    t0 = time.time()
    subprocess.run(
        [sys.executable, "-m", "training.train", "--config", "tiny", *sets],
        cwd=REPO,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=open(work / "reference.log", "wb"),
    )
    wall = time.time() - t0
    ref = {"wall_s": round(wall, 1), "rows": read_lines(run / "metrics.jsonl")}
    (work / "reference.json").write_text(json.dumps(ref))
    return ref


def goodput(rows: list[dict], wall_s: float) -> float:
    """The training time of the steps in the trace (each step once: the last time it was trained) over wall."""
    last = {r["step"]: r for r in rows}
    return sum(r["step_ms"] for r in last.values()) / 1000 / wall_s


def _median(rows: list[dict], key: str) -> float | None:
    xs = [r[key] for r in rows if r[key] is not None]
    return round(statistics.median(xs), 2) if xs else None


def summarise(faults: list[dict]) -> dict:
    out = {}
    for kind in FAULTS:
        rows = [f for f in faults if f["fault"] == kind]
        if not rows:
            continue
        out[kind] = {
            "count": len(rows),
            "detected_s": _median(rows, "detected_s"),
            "training_again_s": _median(rows, "training_again_s"),
            "steps_redone": sum(r["steps_redone"] for r in rows),
        }
    return out


def table(res: dict) -> str:
    s = res["soak"]
    lines = [
        f"soak: {s['wall_s'] / 60:.1f} min, {len(res['faults'])} faults, flow exit {s['flow_exit']}, "
        f"trace identical to the uninterrupted run: {res['trace_identical']}, steps missing: "
        f"{len(res['steps_missing'])}",
        f"goodput: {res['goodput']:.1%} under faults | {res['reference_goodput']:.1%} one plain "
        "process, no faults (the anchor)",
        "",
        "| fault | count | detected after (median) | training again after (median) | steps redone |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for kind, r in res["by_fault"].items():

        def f(x):
            return "n/a" if x is None else f"{x:.1f} s"

        lines.append(
            f"| {kind} | {r['count']} | {f(r['detected_s'])} | {f(r['training_again_s'])} | "
            f"{r['steps_redone']} |"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12000, help="the run's max_steps")
    ap.add_argument("--batch-tokens", type=int, default=128)
    ap.add_argument("--checkpoint-every", type=int, default=500)
    ap.add_argument(
        "--every",
        type=lambda t: tuple(float(x) for x in t.split(":")),
        default=(60.0, 180.0),
        help="seconds between a recovery and the next fault, LO:HI",
    )
    ap.add_argument(
        "--faults",
        help=f"comma-separated, from {','.join(FAULTS)} (default: all; all but store on a local store)",
    )
    ap.add_argument(
        "--store",
        choices=("local", "s3"),
        default="local",
        help="the run's store: a local folder, or moto's S3 server behind a relay (the store fault)",
    )
    ap.add_argument("--hang-floor", type=float, default=20.0)
    ap.add_argument("--cordon-s", type=float, default=90.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", help="keep the run here (default: a temporary folder, removed)")
    ap.add_argument("--reference", help="a reference run's folder to reuse (same settings)")
    ap.add_argument("--out", help="results JSON (default bench/results/fault_soak-<when>.json)")
    ap.add_argument("--render", help="print the table of a results JSON and exit")
    return ap


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    if a.faults is None:
        a.faults = ",".join(k for k in FAULTS if a.store == "s3" or k != "store")
    if "store" in a.faults.split(",") and a.store != "s3":
        _parser().error("the store fault needs --store s3")
    if a.render:
        print(table(json.loads(Path(a.render).read_text())))
        return 0
    when = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(a.out or REPO / "bench" / "results" / f"fault_soak-{when}.json")
    work = Path(a.work or tempfile.mkdtemp(prefix="fault-soak-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "prefect").mkdir(exist_ok=True)
    server = PrefectServer(work / "prefect")
    soak = s3 = None
    cluster = REPO / "cluster" / "local" / "slurm_cluster.sh"
    started = subprocess.run(["bash", str(cluster), "status"], capture_output=True).returncode != 0
    if started:
        subprocess.run(["bash", str(cluster), "start"], check=True, capture_output=True)
    try:
        data = random_shards(work / "data", (4096, 4_000_000))
        ref = reference(a, work, data, a.reference)
        print(f"reference: {ref['wall_s']:.0f} s", file=sys.stderr, flush=True)
        server.start()
        if a.store == "s3":
            s3 = S3Store(work)
        soak = Soak(a, work, data, server, s3)
        result = soak.go()
        rows = soak.files.lines("metrics.jsonl")
    finally:
        if soak is not None and soak.flow is not None:
            stop_group(soak.flow, signal.SIGKILL)
        server.stop()
        if s3 is not None:
            s3.stop()
        for host in ("n1", "n2"):
            slurm("scontrol", "update", f"NodeName={host}", "State=RESUME")
        if started:
            subprocess.run(["bash", str(cluster), "stop"], capture_output=True)
    final = {r["step"]: r["loss"] for r in rows}
    expect = {r["step"]: r["loss"] for r in ref["rows"]}
    res = {
        "when": when,
        "machine": cpu_machine(),
        "settings": {k: v for k, v in vars(a).items() if k not in ("render",)},
        "soak": result,
        "faults": soak.faults,
        "by_fault": summarise(soak.faults),
        "goodput": goodput(rows, result["wall_s"]),
        "reference_goodput": goodput(ref["rows"], ref["wall_s"]),
        "trace_identical": final == expect,
        "steps_missing": sorted(set(range(a.steps)) - set(final)),
        "flow_starts": soak.flow_starts,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(table(res))
    print(f"results: {out}")
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)
    ok = result["flow_exit"] == 0 and res["trace_identical"] and not res["steps_missing"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
