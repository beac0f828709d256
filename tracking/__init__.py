"""Experiment trackers (MLflow, Weights & Biases) fed from a run directory, off the training nodes.

records.py reads what a tracker shows from the run directory; mlflow_tracker.py and wandb_tracker.py speak to
each tracker; mirror.py keeps one tracker run in step with one run directory (`python -m tracking.mirror`).
"""
