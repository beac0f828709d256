"""Tracker credentials: read by the tracker mirror only, never by the training nodes, never logged.

They come from the environment of whoever starts the mirror (the Prefect worker, or a person) or from the
flow's Secret block. The flow takes them out of its own environment for as long as it runs, so that neither a
local training process nor a Slurm job (sbatch exports the submitting environment) receives them, and hands
them to the mirror's process alone."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, MutableMapping

CREDENTIAL_VARS = (
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_CLIENT_CERT_PATH",
    "WANDB_API_KEY",
    "DATABRICKS_TOKEN",
)
# the tracker's place is not secret, but a URI may carry a user and password
_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.I)


def take_credentials(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Remove the tracker credentials from `environ` and return them."""
    return {name: environ.pop(name) for name in CREDENTIAL_VARS if name in environ}


def redact(text: str, secrets: Mapping[str, str] | None = None) -> str:
    """`text` with every credential value and a URI's user:password replaced, for logs and records."""
    secrets = dict(os.environ) if secrets is None else secrets
    for name in CREDENTIAL_VARS:
        value = secrets.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return _USERINFO.sub(lambda m: m.group("scheme") + "***@", text)
