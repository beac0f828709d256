"""Slurm launch through submitit: multi-node torchrun, requeue on preemption, job specs."""
