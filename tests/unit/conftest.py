"""The quick tier: no subprocess and no server (the whole tier runs in ~2 minutes on 2 cores). A test that
starts a process belongs in tests/e2e/: here it fails at once, saying so."""

import subprocess

import pytest


@pytest.fixture(autouse=True, scope="module")
def _no_processes():
    def refuse(self, args, *a, **k):
        raise AssertionError(
            f"a unit test starts no process ({args!r}): move the test to tests/e2e/"
        )

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(subprocess.Popen, "__init__", refuse)
        yield
