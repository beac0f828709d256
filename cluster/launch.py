"""The callable submitit runs once per node: torchrun for `training.train`, signal forwarding and requeue.

One submitit task per node starts
    python -m torch.distributed.run --nnodes N --nproc_per_node P --node_rank $SLURM_NODEID
        --master_addr <first host> --master_port <from the job id> -m cluster.worker <training args>
Static rendezvous, not c10d: c10d ignores --node_rank, and rank == node order keeps logs and checkpoints readable.
Before that, the node checks itself (cluster/node_check.py) and, in a job of several nodes, meets the others in
one all-reduce that must finish within a timeout; a node unfit to train on, or that cannot reach the others,
fails the job at once, naming its host.

Preemption / time limit: Slurm sends USR2 to every process of the job step. torchrun itself ignores USR2 (it
would die of it); its workers catch it, finish the step, write a collective checkpoint and exit 75
(exit_codes.REQUEUE). On the first task submitit calls `checkpoint()`: it forwards USR2 to the torchrun process
group (in case the workers were not signalled directly), waits for them to stop and returns a resubmission with
the timeout or preemption counted, or raises once a cap is reached. Every requeue and the end are appended
to {run_dir}/attempts.jsonl.
An "attempt" here is one start of the job by Slurm (SLURM_RESTART_COUNT); the flow calls each job it
submits a "submission".

Nothing secret is pickled: the object holds the config name, overrides and counters; credentials reach the
workers through the job's environment (sbatch exports the submitting environment at run time).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from cluster import failure, rank_exits
from common import store
from common.errors import ReproError
from common.exit_codes import DIVERGED, REQUEUE
from common.heartbeat import host_name
from common.layout import RunDir
from common.process_tree import descendants, kill_tree

REPO = Path(__file__).resolve().parent.parent
log = logging.getLogger("cluster.launch")


def _ignore_job_signals() -> None:
    """In torchrun, before it starts: the signals this launcher handles for the whole node."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, signal.SIG_IGN)


class RunFailed(ReproError):
    """The training run ended without completing and will not be requeued; the message says why."""


class RequeueCapReached(RunFailed):
    pass


class JobHung(RunFailed):
    """A job whose ranks stopped stepping, cancelled by its watcher; `silent`: its silent ranks (host:rank)."""

    def __init__(self, message: str, silent: list[str]):
        super().__init__(message)
        self.silent = silent


# Ports derived from the job id, so that every node computes the same ones without talking, kept in 20000-31999:
# below Linux's ephemeral range (32768-60999), where any outgoing connection on the node may hold a port.
_PORTS = 6000


def master_port(job_id: str) -> int:
    """torchrun's rendezvous port: two jobs sharing a node use different ones unless their ids differ by a
    multiple of 6000."""
    return 20000 + int(str(job_id).split("_")[0]) % _PORTS


def node_check_port(job_id: str) -> int:
    """Where node 0 hosts the node check's all-reduce: a range of its own, so that the check's store, or a
    socket of it not yet released, never holds the port torchrun's rendezvous binds next."""
    return 20000 + _PORTS + int(str(job_id).split("_")[0]) % _PORTS


@dataclasses.dataclass
class TrainLaunch:
    config: str
    overrides: list[str]
    run_dir: str
    procs_per_node: int
    exit_root: str  # shared folder for per-rank exit records
    time_min: int
    max_timeout_requeues: int
    max_preemption_requeues: int
    stop_timeout_s: float = 60.0
    gpus_per_node: int = 0
    timeouts: int = 0
    preemptions: int = 0

    # ------------------------------------------------------------------ run on each node

    def __call__(self) -> dict[str, Any]:
        import submitit

        if not logging.getLogger().handlers:
            logging.basicConfig(
                level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
            )
        env = submitit.JobEnvironment()
        self._start = time.time()
        self._signalled: str | None = None
        self._node, self._nnodes, self._job_id = env.node, env.num_nodes, env.job_id
        self._attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        self._exit_dir = os.path.join(self.exit_root, f"{self._job_id}_{self._attempt}")
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            self._chain(sig)
        self._proc: subprocess.Popen | None = None
        self._done = threading.Event()
        self._killed = False
        signal.signal(signal.SIGALRM, self._kill_now)
        self._check_node(list(env.hostnames))
        proc = self._proc = self._start_torchrun(env.hostnames[0])

        # A thread reaps torchrun so that checkpoint(), which runs inside a signal handler, can wait on an Event
        # instead of re-entering Popen.wait.
        def reap() -> None:
            proc.wait()
            self._done.set()

        threading.Thread(target=reap, daemon=True).start()
        try:
            while not self._done.wait(0.5):
                pass
            return self._outcome(proc)
        finally:
            self._stop_children(proc)

    def _check_node(self, hosts: list[str]) -> None:
        """The node checks itself (and meets the others); a node unfit to train on ends this task, and srun
        (--kill-on-bad-exit) the others: the job fails naming the host, with its failure record."""
        from cluster.node_check import run_node_check

        problem = run_node_check(
            self.gpus_per_node,
            self.run_dir,
            node=self._node,
            hosts=hosts,
            port=node_check_port(self._job_id),
        )
        if problem:
            failure.write(self._exit_dir, self._node, problem)
            log.error("%s", problem.line())
            raise RunFailed(problem.line())

    def _start_torchrun(self, master: str) -> subprocess.Popen:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={self._nnodes}",
            f"--nproc_per_node={self.procs_per_node}",
            f"--node_rank={self._node}",
            f"--master_addr={master}",
            f"--master_port={master_port(self._job_id)}",
            "--max_restarts=0",
            "-m",
            "cluster.worker",
            "--config",
            self.config,
            *[a for kv in self.overrides for a in ("--set", kv)],
        ]
        penv = dict(os.environ, CLUSTER_EXIT_DIR=self._exit_dir, PYTHONUNBUFFERED="1")
        cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", os.cpu_count() or 1))
        penv.setdefault("OMP_NUM_THREADS", str(max(1, cpus // self.procs_per_node)))
        log.info(
            "node %d/%d attempt %d: %s", self._node, self._nnodes, self._attempt, " ".join(cmd)
        )
        # Own session: signals go to torchrun and its workers as a group. USR2 ignored in torchrun (the
        # default action would kill it); the workers inherit the ignore and training installs its own handler.
        # ALRM ignored too: `scancel --signal=ALRM` reaches every process of the step, and a torchrun it killed
        # would orphan its ranks out of reach of this launcher's kill (a stopped rank would live on, holding the
        # run's lease).
        return subprocess.Popen(
            cmd,
            cwd=REPO,
            env=penv,
            start_new_session=True,
            preexec_fn=_ignore_job_signals,
        )

    def _chain(self, sig: signal.Signals) -> None:
        """Remember that Slurm signalled us, then let submitit's handler (checkpoint/requeue or bypass) run."""
        prev = signal.getsignal(sig)

        def handler(signum, frame):
            self._signalled = signal.Signals(signum).name
            if callable(prev):
                prev(signum, frame)

        signal.signal(sig, handler)

    def _kill_now(self, signum, frame) -> None:
        """SIGALRM: the job is hung (cluster.submit's cancel(kill=True)). Kill torchrun and its ranks at once:
        a frozen or wedged rank cannot checkpoint, and SIGTERM would wake a stopped one to try."""
        log.warning("SIGALRM: the job is being cancelled as hung; killing torchrun and its ranks")
        self._killed = True
        if self._proc is not None:
            kill_tree(self._proc.pid)
        os.makedirs(self._exit_dir, exist_ok=True)
        Path(
            self._exit_dir, f"killed_node_{self._node}"
        ).touch()  # tells the canceller it may scancel now

    def _stop_children(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            log.warning("stopping torchrun (pid %d) and its workers", proc.pid)
            ranks = descendants(proc.pid)  # found now: once torchrun is gone they are out of reach
            _killpg(proc, signal.SIGTERM)
            if not self._done.wait(30):
                _killpg(proc, signal.SIGKILL)
            for pid in ranks:
                try:  # a rank torchrun left behind (it forwards SIGTERM, then exits)
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    # ------------------------------------------------------------------ how this attempt ended

    def _outcome(self, proc: subprocess.Popen) -> dict[str, Any]:
        code = proc.returncode
        if (
            self._killed
        ):  # the scancel that follows ends the job as CANCELLED; not a failure to report first
            time.sleep(max(self.stop_timeout_s, 60))
            raise RunFailed(
                f"the ranks on node {self._node} were killed (SIGALRM: the job was cancelled as hung)"
            )
        first = self.procs_per_node * self._node
        end = rank_exits.job_end(
            rank_exits.read(self._exit_dir), range(first, first + self.procs_per_node), code
        )
        if end.state == "completed":
            if self._node != 0:
                return {"node": self._node, "exit_code": 0}
            result = self._result()
            self._log_attempt("completed", result)
            return {
                **result,
                "job_id": self._job_id,
                "run_dir": self.run_dir,
                "timeouts": self.timeouts,
                "preemptions": self.preemptions,
            }
        if end.state == "stopped":
            return self._stopped()
        if end.state == "diverged":
            return self._diverged()
        raise self._failure(code)

    def _diverged(self) -> dict[str, Any]:
        """Every local rank stopped on the guard's verdict (exit 3): a result for the flow to roll back on."""
        if self._node != 0:
            return {"node": self._node, "exit_code": DIVERGED}
        result = self._result()
        self._log_attempt("diverged", result.get("diverged") or {})
        return {
            **result,
            "job_id": self._job_id,
            "run_dir": self.run_dir,
            "timeouts": self.timeouts,
            "preemptions": self.preemptions,
        }

    def _stopped(self) -> dict[str, Any]:
        """Every local rank checkpointed and exited 75."""
        if self._signalled:
            # Slurm is requeueing (the first task's checkpoint() does it) or killing the job: wait for that
            # rather than leave a result that the restarted job would contradict.
            log.info(
                "node %d: training checkpointed after %s; waiting for the requeue",
                self._node,
                self._signalled,
            )
            time.sleep(max(self.stop_timeout_s, 60))
        if self._node != 0:
            return {"node": self._node, "exit_code": REQUEUE}
        result = self._result()  # stopped without a signal: stop_after_steps
        self._log_attempt("stopped", result)
        return {
            **result,
            "job_id": self._job_id,
            "run_dir": self.run_dir,
            "timeouts": self.timeouts,
            "preemptions": self.preemptions,
        }

    def _failure(self, torchrun_code: int) -> RunFailed:
        time.sleep(
            2
        )  # let the other nodes' ranks record their exits (shared folder) to find the first failure
        first = rank_exits.job_end(
            rank_exits.read(self._exit_dir),
            range(self._nnodes * self.procs_per_node),
            torchrun_code,
        ).first_failure
        latest = self._latest_checkpoint()
        if first is not None:
            why = first.failure()
            msg = f"{first.first_line()}:\n{first.error.strip()[-3000:]}"
        else:
            why = failure.Failure(
                "killed",
                host_name(),
                f"torchrun on node {self._node} exited {torchrun_code} with no rank reporting an error "
                "(killed: out of memory, node failure?)",
            )
            msg = why.detail
        failure.write(self._exit_dir, self._node, why)  # what the flow acts on (cordons)
        traces = self._nccl_traces()
        if traces:  # NCCL's watchdog took the ranks down after a collective timed out: its account of who was late
            msg += f"\nNCCL flight recorder dumps: {traces} (read them with `torchfrtrace {traces} -p rank_`)"
        msg += f"\nlatest checkpoint: {latest}"
        if self._node == 0:
            self._log_attempt("failed", {"reason": msg.splitlines()[0], "checkpoint": latest})
        return RunFailed(msg)

    def _nccl_traces(self) -> str | None:
        """This attempt's flight-recorder folder (training/distributed.py flight_recorder_env), if a rank dumped."""
        for folder in (
            RunDir(self.run_dir).nccl_traces(f"{self._job_id}-{self._attempt}"),
            os.path.join(self._exit_dir, "nccl-traces"),
        ):
            if store.is_local(folder) and os.path.isdir(folder) and os.listdir(folder):
                return folder
        return None

    def _result(self) -> dict[str, Any]:
        return store.read_json(RunDir(self.run_dir).result)

    def _latest_checkpoint(self) -> str | None:
        from training import checkpoint as ck  # torch: only when a failure is reported

        try:
            latest = ck.latest_checkpoint(self.run_dir)
        except Exception as err:  # reporting a failure must not fail on an unreadable store
            return f"unknown ({err})"
        return latest.url if latest else None

    def _log_attempt(self, event: str, info: dict[str, Any]) -> None:
        rec = {
            "event": event,
            "job_id": self._job_id,
            "attempt": self._attempt,
            "time": time.time(),
            "timeouts": self.timeouts,
            "preemptions": self.preemptions,
            **info,
        }
        log.info("attempt %s", json.dumps(rec))
        try:
            store.append_text(RunDir(self.run_dir).attempts, json.dumps(rec) + "\n")
        except Exception as err:
            log.warning("could not append to attempts.jsonl: %s", err)

    # ------------------------------------------------------------------ requeue (first task only)

    def _timed_out(self) -> bool:
        # submitit's rule (JobEnvironment.has_timed_out): a signal after min(80%, limit - 10 min) is the limit.
        limit = self.time_min * 60
        return time.time() - self._start >= min(0.8 * limit, limit - 600)

    def checkpoint(self):
        """Called by submitit on USR2 (first task): stop training with a checkpoint, then requeue or give up."""
        from submitit.helpers import DelayedSubmission

        timed_out = self._timed_out()
        reason = "timeout" if timed_out else "preemption"
        log.warning("%s signal: asking training to checkpoint", reason)
        if self._proc is not None:  # else still in the node check: no training to stop
            kill_tree(
                self._proc.pid, signal.SIGUSR2
            )  # the ranks too: torchrun starts each in its own session
            if not self._done.wait(self.stop_timeout_s):
                log.warning(
                    "training did not stop within %.0f s; requeueing from the latest checkpoint",
                    self.stop_timeout_s,
                )
        try:
            result = self._result()
        except Exception:
            result = {}
        nxt = dataclasses.replace(
            self, timeouts=self.timeouts + timed_out, preemptions=self.preemptions + (not timed_out)
        )
        info = {
            "reason": reason,
            "step": result.get("final_step"),
            "checkpoint": self._latest_checkpoint(),
        }
        if (
            nxt.timeouts > self.max_timeout_requeues
            or nxt.preemptions > self.max_preemption_requeues
        ):
            cap = self.max_timeout_requeues if timed_out else self.max_preemption_requeues
            self._log_attempt("gave_up", info)
            raise RequeueCapReached(
                f"{reason} #{nxt.timeouts if timed_out else nxt.preemptions} exceeds the cap "
                f"of {cap} requeues; not requeued. latest checkpoint: {info['checkpoint']}"
            )
        self._log_attempt("requeue", info)
        return DelayedSubmission(nxt)

    def __getstate__(self) -> dict[str, Any]:
        # Only the dataclass fields travel (no process handles, events or per-attempt state).
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _killpg(proc: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
