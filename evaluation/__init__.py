"""Evaluation of checkpoints: HellaSwag (its data and our scorer), lm-eval-harness, the evaluate CLI, and the
loss and accuracy curves of a run. Reads checkpoints; never writes into training's files."""
