"""The training job: the GPT-2 model, the step and the loop, checkpoints and resume, the shard loader, HF
weight conversion and sampling. Reads token shards, writes a run directory; never imports Prefect or submitit."""
