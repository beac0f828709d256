"""Store credentials for a flow run from a Prefect Secret block, never from a parameter.

Parameters are shown and stored by the Prefect UI; a Secret block is not. The block holds a JSON object of
environment variables (e.g. {"AWS_ACCESS_KEY_ID": ..., "AWS_SECRET_ACCESS_KEY": ..., "FSSPEC_S3_ENDPOINT_URL": ...}).
They are put into this process's environment, which the local executor's subprocesses inherit and sbatch
exports to the Slurm job at run time, so they reach every rank without being written to a job script or pickle.
"""

from __future__ import annotations

import json
import os

from common.errors import BadInput


class CredentialsError(BadInput, ValueError):
    """The Secret block is missing or does not hold a JSON object of environment variables."""


async def apply_secret(name: str) -> list[str]:
    """Load the block into os.environ; returns the variable names (never the values) for the log."""
    from prefect.blocks.system import Secret

    try:
        block: Secret = await Secret.aload(name)
        value = block.get()
    except ValueError as err:
        raise CredentialsError(f"no Prefect Secret block named {name!r} ({err})") from None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise CredentialsError(
                f"Secret {name!r} is not a JSON object of environment variables"
            ) from None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise CredentialsError(f"Secret {name!r} must map variable names to string values")
    os.environ.update(value)
    refresh_store_config()
    return sorted(value)


def refresh_store_config() -> None:
    """fsspec reads FSSPEC_* variables at import and s3fs caches clients: pick up what was just set."""
    import fsspec.config

    fsspec.config.set_conf_env(fsspec.config.conf, os.environ)
    try:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
    except ImportError:
        pass
