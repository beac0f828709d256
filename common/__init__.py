"""The ground floor every package stands on: the store (fsspec I/O), the store and run-directory layout, the
token-shard format, the GPT-2 tokenizer files, exit codes, errors and the CLI wrapper. No torch, Prefect or
submitit here."""
