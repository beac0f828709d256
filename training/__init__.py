"""GPT-2 model, training loop, checkpoints, sampling and evaluation. Never imports Prefect or submitit."""
