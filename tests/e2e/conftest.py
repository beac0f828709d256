"""The end-to-end tier: the real parts, each started by the tests (a Prefect server, the local Slurm cluster,
moto's S3 server, MLflow, torchrun over gloo, the CLIs as a user runs them). Shared fixtures: ../conftest.py."""
