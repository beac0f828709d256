"""Tracker credentials: read by the tracker mirror only, never by the training nodes, never logged.

They come from the environment of whoever starts the mirror (the Prefect worker, or a person) or from the
flow's Secret block. The flow takes them out of its own environment for as long as it runs, so that neither a
local training process nor a Slurm job (sbatch exports the submitting environment) receives them, and hands
them to the mirror's process alone."""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping

from common.secrets import redact as common_redact

CREDENTIAL_VARS = (
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_CLIENT_CERT_PATH",
    "WANDB_API_KEY",
    "DATABRICKS_TOKEN",
)


def take_credentials(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Remove the tracker credentials from `environ` and return them."""
    return {name: environ.pop(name) for name in CREDENTIAL_VARS if name in environ}


class _Held:
    """The credentials taken out of this process's environment while any flow run in it needs them kept out: one
    process may run several flow runs at once (a sweep's trials). The first to enter takes them, every one gets
    them, and the last to leave puts them back."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.holders = 0

    def enter(self, environ: MutableMapping[str, str]) -> dict[str, str]:
        self.values.update(take_credentials(environ))
        self.holders += 1
        return dict(self.values)

    def leave(self, environ: MutableMapping[str, str]) -> None:
        self.holders -= 1
        if self.holders <= 0:
            self.holders = 0
            environ.update(self.values)
            self.values.clear()


HELD = _Held()


def redact(text: str, secrets: Mapping[str, str] | None = None) -> str:
    """`text` with every tracker credential value and a URI's user:password replaced, for logs and records."""
    return common_redact(text, CREDENTIAL_VARS, secrets)
