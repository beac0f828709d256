"""Prefect flows: orchestrate data prep, Slurm training and evaluation (no model math here)."""
