"""Secrets in text: the one redaction every sink uses (logs, records, messages), and the check that keeps a
password out of a URL that would be stored or shown (a run's config, the flow's parameters in the UI)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

# scheme://user:password@host: the password (a user alone, as sftp://user@host takes it, is no secret)
_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s:]*:[^/@\s]*@", re.I)
_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.I)


def has_password(url: str) -> bool:
    """Whether `url` carries a password (scheme://user:password@...)."""
    return bool(_PASSWORD.match(url.strip()))


def redact(text: str, names: Iterable[str] = (), secrets: Mapping[str, str] | None = None) -> str:
    """`text` with the values of the environment variables `names` (from `secrets`, default os.environ) and a
    URL's user:password replaced by ***."""
    secrets = dict(os.environ) if secrets is None else secrets
    for name in names:
        value = secrets.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return _USERINFO.sub(lambda m: m.group("scheme") + "***@", text)
