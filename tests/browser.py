"""Headless-Chromium helpers for tests that look at the Prefect UI.

Why: the Prefect UI is a JavaScript app, so plain HTTP requests only return an
empty shell. To check what a user really sees (run name, state, artifact
markdown with loss/eval plot images) we let headless Chromium execute the JS
and either dump the rendered DOM or take a screenshot.

Notes:
- The UI needs ``Accept: text/html`` for deep links; Chromium sends it.
- ``--virtual-time-budget`` lets the page finish its API calls before the dump.
- Each call uses a fresh temporary profile (``--user-data-dir``) so runs never
  share state or lock each other.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


class BrowserError(RuntimeError):
    """Chromium is missing, failed or timed out."""


def chromium_path(install: bool = True) -> str | None:
    """Path of chromium / chromium-browser; installs Debian ``chromium`` via apt-get
    when missing and we are root (and ``install`` is true). None if unavailable."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    if install and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
        try:
            # a fresh machine has no package lists yet
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
            subprocess.run(cmd, env=env, capture_output=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return shutil.which("chromium") or shutil.which("chromium-browser")
    return None


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    exe = chromium_path()
    if exe is None:
        raise BrowserError("chromium not found (apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        cmd = [exe, *FLAGS, f"--user-data-dir={profile}", *args]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise BrowserError(f"chromium timed out after {timeout:.0f} s: {cmd}") from exc
    if proc.returncode != 0:
        raise BrowserError(f"chromium exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


def screenshot(
    url: str,
    png_path: str,
    width: int = 1400,
    height: int = 900,
    budget_ms: int = 15000,
    timeout: float | None = None,
) -> str:
    """Render ``url`` and save a PNG screenshot to ``png_path``; returns the path."""
    png_path = os.path.abspath(png_path)
    if os.path.exists(png_path):
        os.remove(png_path)
    _run(
        [
            f"--screenshot={png_path}",
            f"--window-size={width},{height}",
            f"--virtual-time-budget={budget_ms}",
            url,
        ],
        timeout or budget_ms / 1000 + 60,
    )
    if not os.path.exists(png_path) or os.path.getsize(png_path) == 0:
        raise BrowserError(f"chromium wrote no screenshot for {url}")
    return png_path


def dump_dom(url: str, budget_ms: int = 15000, timeout: float | None = None) -> str:
    """Return the rendered HTML of ``url`` after its JavaScript has run."""
    proc = _run(
        [f"--virtual-time-budget={budget_ms}", "--dump-dom", url], timeout or budget_ms / 1000 + 60
    )
    if not proc.stdout.strip():
        raise BrowserError(f"chromium dumped an empty DOM for {url}")
    return proc.stdout
