"""The quick tier: no subprocess and no server (the whole tier runs in ~2 minutes on 2 cores). A test that
starts a process belongs in tests/e2e/: here it fails at once, saying so."""

import os
import subprocess
import sys

import pytest

# Triton kernels run on the CPU under Triton's interpreter, which Triton reads when it is first imported
# (torch._dynamo imports it): set here, before any test module loads. The GPU tests (tests/e2e/) run them
# compiled.
if "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="module")
def _no_processes():
    def refuse(self, args, *a, **k):
        raise AssertionError(
            f"a unit test starts no process ({args!r}): move the test to tests/e2e/"
        )

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(subprocess.Popen, "__init__", refuse)
        yield
