"""What a run directory on an object store costs the training loop: the same run into a local folder (the
anchor) and into S3 (moto's S3 server, started here on 127.0.0.1, answering each request `--latency-ms` late as
a store across a network does), side by side.

    python bench/store_overhead.py                      # tiny preset, 100 steps, a sample every 10
    python bench/store_overhead.py --config demo --steps 200 --sample-every 20
    python bench/store_overhead.py --render FILE        # the markdown table

Object stores have no append: every growing file of the run (metrics, telemetry, samples, events) is rewritten
whole, which the loop must never wait for (common/logfiles.py). Each variant is training.train's job in a
process of its own (this script with `--loop-clock`), on one core (the other is left to the S3 server), on
seeded random token shards (read from local disk by both), with samples and telemetry windows at the given
cadence and no checkpoint but the last. From each run:
- step: the median `step_ms` of metrics.jsonl (the optimizer step alone);
- loop: the time from one metrics line to the next, i.e. everything the loop does per step: validation,
  samples, the step, telemetry, logging and the stop check (timed inside the training process);
- loop on sample steps: the median loop time of the steps that took a sample (a line of samples.jsonl): where
  a write to the store from the loop would show;
- vs local: each figure of the S3 run against the local run's.
Needs moto's server (`pip install 'moto[server]'`, in the project's test extras).
"""

from __future__ import annotations

import argparse
import json
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

VARIANTS = ("local", "s3")


def loop_clock(argv: list[str], out: str) -> int:
    """Train in this process with the time of every metrics line noted (written to `out` at exit)."""
    from training import metrics, train

    stamps: list[float] = []
    log = metrics.MetricsLog.log

    def timed(self, record):
        stamps.append(time.perf_counter())
        log(self, record)

    metrics.MetricsLog.log = timed
    try:
        return train.main(argv)
    finally:
        Path(out).write_text(json.dumps(stamps))


def start_s3(latency_ms: float) -> tuple[object, dict[str, str]]:
    """moto's S3 server on a free local port, answering every request `latency_ms` late (moto on this host
    answers in a millisecond or two, a real store tens), a bucket `bench` in it, and the environment that
    reaches it. Stop it with `.shutdown()`."""
    import logging
    import socket
    import threading

    import s3fs
    from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    moto = DomainDispatcherApplication(create_backend_app)

    def app(environ, start_response):
        time.sleep(latency_ms / 1000)
        return moto(environ, start_response)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = make_server("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler)
    threading.Thread(target=server.serve_forever, name="s3", daemon=True).start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "FSSPEC_S3_ENDPOINT_URL": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    s3fs.S3FileSystem(
        key="bench", secret="bench", endpoint_url=endpoint, skip_instance_cache=True
    ).mkdir("bench")
    return server, env


def run_variant(
    a: argparse.Namespace, data: str, run_dir: str, env: dict[str, str], clock: str
) -> dict:
    sets = [
        f"run_dir={run_dir}",
        f"data_url={data}",
        f"max_steps={a.steps}",
        f"checkpoint_every={10 * a.steps}",
        f"sample_every={a.sample_every}",
        f"telemetry_every={a.sample_every}",
        f"val_every={10 * a.steps}",
        *a.set,
    ]
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--loop-clock",
        clock,
        "--config",
        a.config,
        *[x for kv in sets for x in ("--set", kv)],
    ]
    # training on one core: the other is left to moto's server, which stands for a store on other machines
    p = subprocess.run(
        cmd,
        cwd=REPO,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **env),
    )
    if p.returncode != 0:
        raise SystemExit(f"training failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    rows = [json.loads(x) for x in store_text(f"{run_dir}/metrics.jsonl", env).splitlines()]
    samples = [
        json.loads(x)["step"] for x in store_text(f"{run_dir}/samples.jsonl", env).splitlines()
    ]
    stamps = json.loads(Path(clock).read_text())
    loop = [
        1000 * (b - a) for a, b in zip(stamps, stamps[1:])
    ]  # loop[i]: from step i's line to step i+1's
    on_samples = [loop[s - 1] for s in samples if 0 < s <= len(loop)]
    return {
        "steps": len(rows),
        "samples": len(samples),
        "step_ms": statistics.median(r["step_ms"] for r in rows),
        "loop_ms": statistics.median(loop),
        "loop_mean_ms": statistics.fmean(loop),
        "sample_loop_ms": statistics.median(on_samples) if on_samples else None,
    }


def store_text(url: str, env: dict[str, str]) -> str:
    """A file of the run, from the store it was written to (this process is not set up for S3 otherwise)."""
    if not url.startswith("s3://"):
        return Path(url).read_text()
    import s3fs

    fs = s3fs.S3FileSystem(
        key=env["AWS_ACCESS_KEY_ID"],
        secret=env["AWS_SECRET_ACCESS_KEY"],
        endpoint_url=env["FSSPEC_S3_ENDPOINT_URL"],
        skip_instance_cache=True,
    )
    return fs.cat_file(url[len("s3://") :]).decode()


def summary(rows: list[dict]) -> list[dict]:
    out = []
    for name in VARIANTS:
        rs = [r for r in rows if r["variant"] == name]
        out.append(
            {
                "variant": name,
                "runs": len(rs),
                **{
                    k: statistics.median(r[k] for r in rs)
                    if all(r[k] is not None for r in rs)
                    else None
                    for k in ("step_ms", "loop_ms", "loop_mean_ms", "sample_loop_ms")
                },
            }
        )
    base = out[0]  # the local run directory: the anchor
    for r in out:
        for k in ("step_ms", "loop_ms", "loop_mean_ms", "sample_loop_ms"):
            r[f"{k}_vs_local"] = r[k] / base[k] - 1 if r[k] is not None and base[k] else None
    return out


def table(res: dict) -> str:
    pct = lambda x: "-" if x is None else f"{100 * x:+.1f}%"  # noqa: E731
    lines = [
        "| run directory | step ms | loop ms | loop ms, mean | loop ms on sample steps | step vs local | "
        "loop vs local | sample steps vs local |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["summary"]:
        lines.append(
            f"| {r['variant']} | {r['step_ms']:.1f} | {r['loop_ms']:.1f} | {r['loop_mean_ms']:.1f} | "
            f"{cell(r['sample_loop_ms'], '.1f')} | {pct(r['step_ms_vs_local'])} | "
            f"{pct(r['loop_ms_vs_local'])} | {pct(r['sample_loop_ms_vs_local'])} |"
        )
    st = res["settings"]
    sets = "".join(f" --set {kv}" for kv in st["set"])
    lines += [
        "",
        f"{st['config']}{sets}, {st['steps']} steps, a sample and a telemetry window every "
        f"{st['sample_every']}; s3: moto's S3 server on this machine, each answer "
        f"{st.get('latency_ms', 0):g} ms late; median of {st['repeat']} run(s) per variant.",
        "",
        measured_on(res),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--loop-clock"]:
        return loop_clock(argv[2:], argv[1])
    ap = argparse.ArgumentParser(
        prog="python bench/store_overhead.py", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--config", default="tiny")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="more training overrides"
    )
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--sample-every", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument(
        "--latency-ms", type=float, default=30.0, help="added to every answer of the S3 server"
    )
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument(
        "--render", metavar="FILE", help="print the markdown table of a results file and exit"
    )
    a = ap.parse_args(argv)
    if a.render:
        return render(a.render, table)
    server, s3_env = start_s3(a.latency_ms)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = random_shards(Path(tmp) / "data", (65536, 1 << 20))
            rows = []
            for i in range(a.repeat):
                for name in VARIANTS:  # interleaved: drift on a shared machine hits both alike
                    run_dir = f"s3://bench/runs/{i}" if name == "s3" else f"{tmp}/runs/{i}"
                    r = run_variant(
                        a, data, run_dir, s3_env if name == "s3" else {}, f"{tmp}/clock-{name}-{i}"
                    )
                    rows.append({"variant": name, "repeat": i, **r})
                    print(
                        f"  {name} #{i + 1}: step {r['step_ms']:.1f} ms, loop {r['loop_ms']:.1f} ms "
                        f"(mean {r['loop_mean_ms']:.1f}), {r['samples']} samples",
                        flush=True,
                    )
    finally:
        server.shutdown()
    settings = {
        "config": a.config,
        "set": a.set,
        "steps": a.steps,
        "sample_every": a.sample_every,
        "repeat": a.repeat,
        "latency_ms": a.latency_ms,
    }
    return report(settings, rows, summary(rows), table, a.out)


if __name__ == "__main__":
    raise SystemExit(main())
