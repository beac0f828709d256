"""Submit a training run to Slurm as one job (one submitit task per node), watch it, or reattach to it.

    python -m cluster.submit --config configs/gpt2-124m.toml --nodes 2 --gpus-per-node 8 \
        --partition gpu --time 240 --set run_dir=s3://bucket/runs/x [--wait]
    python -m cluster.submit --reattach 1234 --folder slurm_logs --wait

Environment: nothing from the environment is pickled or written into the job script. sbatch exports the
submitting process's environment to the job at run time (Slurm's default --export=ALL), so store credentials
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, FSSPEC_S3_ENDPOINT_URL, ...), HF_TOKEN, TIKTOKEN_CACHE_DIR and
OMP_NUM_THREADS reach torchrun and every rank as they were when `submit` ran.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import submitit

from cluster.launch import JobHung, RunFailed, TrainLaunch
from cluster.resubmission import BACKOFF_SECONDS, MAX_RESUBMITS, MAX_ROLLBACKS
from cluster.sbatch import build_executor
from cluster.spec import JobSpec, with_excluded
from cluster.validate import require_slurm_client, validate
from common import exit_codes, store
from common.cli import add_model_flags, entry_point, model_from_flags, read_json_object
from common.errors import BadInput
from common.heartbeat import HangDetector, HangRules
from common.layout import RunDir
from common.stall import StallAlarm

FINAL_STATES = (
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "ENDED",
)


def sacct_state(job_id: str) -> tuple[str, str]:
    """(State, ExitCode) of the job's allocation from accounting, else squeue's state, else ('ENDED', '')."""
    out = subprocess.run(
        ["sacct", "-j", str(job_id), "-X", "-n", "-P", "-o", "State,ExitCode"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    if out.returncode != 0 or not lines:
        # Not yet in accounting (just submitted): ask the controller.
        sq = subprocess.run(
            ["squeue", "-h", "-j", str(job_id), "-o", "%T"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        # Neither accounting nor the controller knows it: without slurmdbd a finished job just disappears.
        return (sq.stdout.strip() or "ENDED"), ""
    state, code = lines[-1].split(
        "|"
    )  # a requeued job has one line per attempt: the last is current
    if state.startswith(FINAL_STATES):
        # An attempt Slurm ended and requeued by itself (NODE_FAIL) keeps its final record until the job
        # starts again: the controller knows better whether the job itself is over.
        sq = subprocess.run(
            ["squeue", "-h", "-j", str(job_id), "-o", "%T"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        queued = sq.stdout.strip()
        if sq.returncode == 0 and queued and not queued.startswith(FINAL_STATES + ("COMPLETING",)):
            return queued, ""
    return state, code


class JobNotFound(BadInput, LookupError):
    """No job of that id was submitted through cluster.submit under the given folder."""


class RunHandle:
    """A submitted (or reattached) training job."""

    def __init__(
        self,
        job_id: str,
        folder: str,
        nodes: int,
        run_dir: str,
        submitted: dict[str, Any] | None = None,
    ):
        self.job_id, self.folder, self.nodes, self.run_dir = str(job_id), folder, nodes, run_dir
        # what a resubmission needs: {"config", "overrides", "spec"} (absent in records of older versions)
        self.submitted = submitted
        self.job: submitit.SlurmJob = submitit.SlurmJob(
            folder, self.job_id, tasks=list(range(nodes))
        )
        self.job._cancel_at_deletion = False  # a handle going out of scope never cancels the run

    @property
    def exits(self) -> Path:
        """Where the job's launchers keep each attempt's rank exits and failure records."""
        return Path(self.folder) / "exits"

    def _meta_path(self) -> Path:
        return Path(self.folder) / f"{self.job_id}_run.json"

    def save(self) -> None:
        rec = {"job_id": self.job_id, "nodes": self.nodes, "run_dir": self.run_dir}
        self._meta_path().write_text(json.dumps({**rec, **(self.submitted or {})}))

    def state(self) -> str:
        return sacct_state(self.job_id)[0]

    def done(self) -> bool:
        return self.state().startswith(FINAL_STATES)

    def cancel(self, kill: bool = False) -> None:
        """scancel the job (every requeue of it included); a job that has ended already is left as it is.
        `kill`: end its ranks at once, without the checkpoint SIGTERM asks for. A hung job cannot write one (a
        collective would hang), and scancel's SIGCONT would wake a stopped rank to write one while the next
        submission already starts (Slurm turns `--signal=KILL` into that same sequence). So each node's
        launcher gets SIGALRM, SIGKILLs torchrun and every rank it started and says so in the job's exit folder
        (cluster/launch.py); the job is cancelled once every node has, or after 15 s."""
        if kill:
            subprocess.run(
                ["scancel", "--signal=ALRM", self.job_id],
                check=False,
                capture_output=True,
                timeout=60,
            )
            exits, deadline = self.exits, time.time() + 15
            while (
                len(list(exits.glob(f"{self.job_id}_*/killed_node_*"))) < self.nodes
                and time.time() < deadline
            ):
                time.sleep(0.2)
        subprocess.run(["scancel", self.job_id], check=False, capture_output=True, timeout=60)

    def attempts(self) -> list[dict[str, Any]]:
        """The launcher's record of every start, requeue and end of this run (attempts.jsonl)."""
        from common import store

        url = RunDir(self.run_dir).attempts
        if not store.exists(url):
            return []
        return [json.loads(ln) for ln in store.read_bytes(url).decode().splitlines() if ln.strip()]

    def owns(self, heartbeat: dict) -> bool:
        return str(heartbeat.get("slurm_job")) == self.job_id

    def wait(
        self,
        timeout_s: float | None = None,
        poll_s: float = 2.0,
        on_state=None,
        hang: HangRules | None = None,
        on_progress=None,
        progress_s: float = 60.0,
        on_note=None,
    ) -> dict[str, Any]:
        """Blocks until the job ends (requeues included); the training result, or RunFailed with the reason.
        `on_state(state)` is called whenever the job's state changes (PENDING, RUNNING, REQUEUED, ...). With
        `hang`, a job whose ranks stop stepping (common/heartbeat.py) is cancelled and reported as hung.
        `on_progress(line)` gets the ranks' last heartbeats in one line every `progress_s` while it runs;
        `on_note(line)` what the watch itself met: a store or Slurm that did not answer for a while."""
        deadline = None if timeout_s is None else time.time() + timeout_s
        last, shown = None, 0.0
        detector = (
            HangDetector(RunDir(self.run_dir), hang or HangRules(), owns=self.owns)
            if hang or on_progress
            else None
        )
        # a Slurm or store that stops answering is said while it lasts (each call has its deadline too)
        alarm = StallAlarm(on_note or (lambda line: None))
        try:
            while True:
                with alarm.waiting_on(f"Slurm (the state of job {self.job_id})"):
                    state = self.state()
                if state != last and on_state is not None:
                    on_state(state)
                last = state
                if detector is not None and not state.startswith("RUNNING"):
                    detector.paused()  # queued, or requeued after a preemption: its start-up allowance again
                elif detector is not None:
                    detector.started()
                    with alarm.waiting_on(f"the store ({self.run_dir})"):
                        stuck = detector.check()
                    for note in detector.take_notes():
                        if on_note is not None:
                            on_note(note)
                    if stuck is not None and hang is not None:
                        self.cancel(kill=True)
                        raise JobHung(
                            f"job {self.job_id} hung, cancelled: {stuck.message}", stuck.silent
                        )
                    line = (
                        detector.progress()
                        if on_progress and time.monotonic() - shown >= progress_s
                        else None
                    )
                    if line:
                        on_progress(line)
                        shown = time.monotonic()
                if state.startswith(FINAL_STATES):
                    return self.result()
                if deadline is not None and time.time() > deadline:
                    raise TimeoutError(f"job {self.job_id} still {state} after {timeout_s} s")
                time.sleep(poll_s)
        finally:
            alarm.close()

    def result(self, results_wait_s: float = 15.0) -> dict[str, Any]:
        state, code = sacct_state(self.job_id)
        outcomes, errors = [], []
        tasks = [self.job.task(i) for i in range(self.nodes)]
        # A shared filesystem may show a result file late: wait for them once, for all nodes together (a job
        # killed outright writes none, and submitit would wait its 15 s for each node in turn).
        deadline = time.time() + results_wait_s
        while not all(t.paths.result_pickle.exists() for t in tasks) and time.time() < deadline:
            time.sleep(0.5)
        for i, task in enumerate(tasks):
            if not task.paths.result_pickle.exists():
                errors.append(
                    f"node {i}: no result (its task wrote none: killed, or its node died)"
                )
                continue
            try:
                outcome, value = task._get_outcome_and_result()
            except submitit.core.utils.UncompletedJobError as err:
                errors.append(f"node {i}: no result ({str(err).splitlines()[0]})")
                continue
            if outcome == "error":
                errors.append(f"node {i}: {_last_error(value)}")
            outcomes.append(value)
        if (
            state in ("COMPLETED", "ENDED")
            and not errors
            and outcomes
            and isinstance(outcomes[0], dict)
        ):
            return outcomes[0]
        raise RunFailed(f"job {self.job_id} ended {state} (exit {code})\n" + "\n".join(errors))


def _last_error(trace: str) -> str:
    """The raised exception's message out of the traceback text submitit stores."""
    lines = trace.strip().splitlines()
    for i, ln in enumerate(lines):
        if ln.startswith(("cluster.launch.RunFailed", "cluster.launch.RequeueCapReached")):
            return "\n".join(lines[i:])
    return "\n".join(lines[-20:])


def submit(
    spec: JobSpec,
    config: str,
    overrides: list[str] | None = None,
    *,
    check: bool = True,
    exclude: tuple[str, ...] = (),
) -> RunHandle:
    """Validate, then sbatch one job: `spec.nodes` tasks, each running torchrun for `training.train`, off the
    hosts `exclude` (the run's cordons) as well as those the spec excludes. The job's record keeps the spec
    as given, so that the cordons can be lifted from the job when they expire."""
    overrides = list(overrides or [])
    require_slurm_client()
    given, spec = spec, with_excluded(spec, exclude)
    cfg = validate(spec, config, overrides, check_cluster=check, check_data=check)
    launch = TrainLaunch(
        config=str(config),
        overrides=overrides,
        run_dir=cfg.train.run_dir,
        procs_per_node=spec.procs_per_node,
        exit_root=str(Path(spec.folder).resolve() / "exits"),
        time_min=spec.time_min,
        max_timeout_requeues=spec.max_timeout_requeues,
        max_preemption_requeues=spec.max_preemption_requeues,
        stop_timeout_s=max(10.0, spec.signal_delay_s - 10),
        gpus_per_node=spec.gpus_per_node,
    )
    job = build_executor(spec).submit(launch)
    submitted = {
        "config": str(config),
        "overrides": overrides,
        "spec": given.model_dump(mode="json"),
    }
    handle = RunHandle(job.job_id, spec.folder, spec.nodes, cfg.train.run_dir, submitted)
    handle.save()
    return handle


def submit_function(spec: JobSpec, fn, *args, **kwargs) -> submitit.Job:
    """Any picklable function as a job of this spec (evaluation, one-off tools); its return value is the result."""
    require_slurm_client()
    return build_executor(spec).submit(fn, *args, **kwargs)


def reattach(job_id: str, folder: str) -> RunHandle:
    """Watch an existing job (e.g. after the submitting process restarted) instead of submitting a duplicate."""
    path = Path(folder) / f"{job_id}_run.json"
    if not path.exists():
        raise JobNotFound(f"no job {job_id} submitted through cluster.submit under {folder}")
    require_slurm_client()
    try:
        meta = json.loads(path.read_text())
        job, nodes, run_dir = str(meta["job_id"]), meta["nodes"], meta["run_dir"]
        if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
            raise TypeError(f"nodes is {nodes!r}")
        if not isinstance(run_dir, str) or not run_dir:
            raise TypeError(f"run_dir is {run_dir!r}")
    except KeyError as err:
        raise JobNotFound(f"{path} is not a job record (no {err})") from None
    except (ValueError, TypeError) as err:
        raise JobNotFound(f"{path} is not a job record ({err})") from None
    submitted = {k: meta[k] for k in ("config", "overrides", "spec") if k in meta}
    return RunHandle(job, folder, nodes, run_dir, submitted if len(submitted) == 3 else None)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number >= 0")
    return value


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m cluster.submit", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--config", help="preset name or TOML file of the run")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a run config value (repeatable)",
    )
    ap.add_argument("--spec", help="JSON file with JobSpec fields (the flags below override it)")
    ap.add_argument(
        "--wait", action="store_true", help="block until the run ends and print its result"
    )
    ap.add_argument(
        "--reattach", metavar="JOB_ID", help="watch an existing job instead of submitting"
    )
    ap.add_argument(
        "--no-resubmit",
        action="store_true",
        help="with --wait: watch the one job only; a failed or hung job is exit 1",
    )
    ap.add_argument(
        "--max-resubmits",
        type=_count,
        default=MAX_RESUBMITS,
        help="with --wait: resubmissions after failures and hangs (stops and requeues don't count)",
    )
    ap.add_argument(
        "--max-rollbacks",
        type=_count,
        default=MAX_ROLLBACKS,
        help="with --wait: rollbacks past diverging data before the run stops",
    )
    ap.add_argument(
        "--backoff-s",
        type=_seconds,
        default=BACKOFF_SECONDS,
        help="with --wait: wait before resubmitting a failed job (doubled with each further failure)",
    )
    ap.add_argument(
        "--cordon-hours",
        type=_seconds,
        default=24.0,
        help="with --wait: keep a host a failure points at out of the next submissions this long; 0 = never",
    )
    ap.add_argument(
        "--hang-floor-s",
        type=_seconds,
        default=300.0,
        help="with --wait: a job with no new step for "
        "max(--hang-factor x its median step time, this) seconds is hung: cancelled, exit 1; 0 = never",
    )
    ap.add_argument("--hang-factor", type=_seconds, default=20.0)
    ap.add_argument(
        "--startup-timeout-s",
        type=_seconds,
        default=1800.0,
        help="with --wait: hung when no first step this long after the job started running",
    )
    ap.add_argument(
        "--progress-s",
        type=_seconds,
        default=60.0,
        help="with --wait: print the ranks' last heartbeats "
        "(step, s/step, the rank furthest behind, the slowest rank) this often; 0 = never",
    )
    add_model_flags(ap, JobSpec, aliases={"time_min": ["--time"]})
    return ap


@entry_point
def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    folder = getattr(args, "folder", None) or JobSpec().folder
    if not args.reattach and not args.config:
        ap.error("--config is required unless --reattach")
    if args.wait and not args.no_resubmit:
        return _supervise(args, folder)
    if args.reattach:
        handle = reattach(args.reattach, folder)
    else:
        spec = model_from_flags(JobSpec, args, read_json_object(args.spec, "--spec"))
        handle = submit(spec, args.config, args.overrides)
    print(handle.job_id, flush=True)
    if args.wait:
        try:
            print(json.dumps(_watch(handle, args)), flush=True)
        except KeyboardInterrupt:
            return _stopped_watching(handle.job_id, folder)
    return exit_codes.OK


def _supervise(args: argparse.Namespace, folder: str) -> int:
    """--wait: the run to its end, resubmitted through the flow's policy (cluster/supervise.py)."""
    from cluster.supervise import CommandLineSupervisor, Retries  # it builds on this module

    retries = Retries(args.max_resubmits, args.max_rollbacks, args.backoff_s, args.cordon_hours)
    current: list[str] = []

    def on_job(job_id: str) -> None:
        current.append(job_id)
        print(job_id, flush=True)

    def watch(handle: RunHandle) -> dict[str, Any]:
        return _watch(handle, args)

    if args.reattach:
        handle = reattach(args.reattach, folder)
        sup = CommandLineSupervisor.of_job(handle, retries, watch, _say, on_job)
        watching: RunHandle | None = handle
        on_job(args.reattach)
    else:
        spec = model_from_flags(JobSpec, args, read_json_object(args.spec, "--spec"))
        sup = CommandLineSupervisor(spec, args.config, args.overrides, retries, watch, _say, on_job)
        watching = None
    try:
        result = sup.run_to_end(watching)
    except KeyboardInterrupt:
        return _stopped_watching(current[-1] if current else "", folder)
    print(json.dumps(result), flush=True)
    return exit_codes.OK


def _stopped_watching(job_id: str, folder: str) -> int:
    if job_id:
        print(
            f"stopped watching; job {job_id} goes on (python -m cluster.submit --reattach {job_id} "
            f"--folder {folder} --wait)",
            file=sys.stderr,
            flush=True,
        )
    return exit_codes.INTERRUPTED


def _say(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


_PATIENCE = store.OutagePatience()


def _watch(handle: RunHandle, args: argparse.Namespace) -> dict[str, Any]:
    """The job watched to its end, its states and progress on stderr: its result (RunFailed otherwise)."""
    _PATIENCE.start()  # a job runs: from here an outage of its store is waited out (till the command ends)
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S")  # the store says so
    hang = (
        HangRules(args.hang_factor, args.hang_floor_s, args.startup_timeout_s)
        if args.hang_floor_s > 0
        else None
    )

    def say(text: str) -> None:
        _say(f"job {handle.job_id}: {text}")

    return handle.wait(
        on_state=say,
        hang=hang,
        on_progress=say if args.progress_s > 0 else None,
        progress_s=args.progress_s,
        on_note=say,
    )


if __name__ == "__main__":
    raise SystemExit(main())
