"""Exit codes of every command of this project (training, evaluation, data prep, the cluster and flow CLIs).

Slurm, torchrun, the launcher and the flow read them, so they are defined once, here, without importing torch.
"""

OK = 0
FAILED = 1  # the work failed (a crash, a failed job, a run that gave up): retrying may help
BAD_INPUT = 2  # the user's input cannot work (config, data, paths, credentials): reported before work starts
DIVERGED = 3  # training skipped too many updates (non-finite or spiking loss): roll back past the data, or stop
REQUEUE = 75  # EX_TEMPFAIL: stopped on request with a checkpoint written; run the same command again to resume
INTERRUPTED = 130  # a watcher stopped by Ctrl-C (128 + SIGINT); what it watched goes on

MEANING = {
    OK: "done",
    FAILED: "failed",
    BAD_INPUT: "bad input (config, data, paths), reported before anything ran",
    DIVERGED: "diverged: too many skipped updates in a window (the flow rolls back past the offending data)",
    REQUEUE: "stopped with a checkpoint (preemption, time limit, stop_after_steps): run again to resume",
    INTERRUPTED: "stopped watching (Ctrl-C); the job watched goes on",
}
