"""`python -m flows.follow RUN_ID`: a flow run's story on the console (its lines and its subflows', warnings from
anywhere, not the task runs' chatter), until it ends, with an exit status that says how it ended; on a real
Prefect server."""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from helpers import REPO, free_port
from prefect import flow, get_run_logger, task

from common import exit_codes
from flows.follow import main


@task
def _chatty():
    get_run_logger().info("every training step")
    get_run_logger().warning("a rank is slow")


@flow(name="prep-part")
def _sub():
    get_run_logger().info("tokenized 1,000 tokens")


@flow(name="story")
def _story(fail: bool, lines: int):
    log = get_run_logger()
    log.info("the story begins")
    _sub()
    _chatty()
    for i in range(lines):  # more than one page of the server's answer
        log.info("progress %d", i)
    if fail:
        raise RuntimeError("the loss exploded")


def test_a_run_is_followed_to_its_end_as_a_story(prefect_server, capsys):
    state = _story(False, 250, return_state=True)
    assert main([str(state.state_details.flow_run_id)]) == exit_codes.OK
    out = capsys.readouterr().out.splitlines()
    text = "\n".join(out)
    assert "the story begins" in text and "[prep-part] tokenized 1,000 tokens" in text
    assert "WARNING: a rank is slow" in text and "every training step" not in text
    progress = [ln.split(" ", 1)[1] for ln in out if " progress " in ln]
    assert progress == [
        f"progress {i}" for i in range(250)
    ]  # each line once, in order, across pages
    assert out[-1] == "the run ended Completed"


def test_a_failed_run_is_followed_to_its_failure_and_exits_non_zero(prefect_server, capsys):
    state = _story(True, 0, return_state=True)
    assert main([str(state.state_details.flow_run_id), "--tasks"]) == exit_codes.FAILED
    out = capsys.readouterr().out
    assert "every training step" in out  # --tasks: the task runs' lines too
    assert "the run ended Failed" in out and "the loss exploded" in out


def test_a_run_that_is_not_there_is_one_line(prefect_server, capsys):
    missing = uuid.uuid4()
    assert main([str(missing)]) == exit_codes.BAD_INPUT
    assert main(["not-a-run"]) == exit_codes.BAD_INPUT
    assert main([str(missing), "--timeout", "-1"]) == exit_codes.BAD_INPUT
    err = capsys.readouterr().err
    assert f"no flow run {missing} on http" in err and "'not-a-run' is not a flow run id" in err
    assert "--timeout -1.0 is no time" in err
    assert "Traceback" not in err


def test_a_server_that_goes_away_while_followed_is_one_line(tmp_path):
    """A server of its own, stopped for real while a run (scheduled, never picked up) is followed."""
    port = free_port()
    env = dict(
        os.environ,
        PREFECT_HOME=str(tmp_path),
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_CLIENT_MAX_RETRIES="0",  # what is tested is the end of the retries, not their length
    )
    prefect = str(Path(sys.executable).parent / "prefect")
    server = subprocess.Popen(
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        scheduled = (
            "import asyncio\n"
            "from prefect import flow\n"
            "from prefect.client.orchestration import get_client\n"
            "async def main():\n"
            "    async with get_client() as c:\n"
            "        print((await c.create_flow_run(flow(name='waits')(lambda: None))).id)\n"
            "asyncio.run(main())\n"
        )
        deadline = time.time() + 120
        while True:
            made = subprocess.run(
                [sys.executable, "-c", scheduled], env=env, capture_output=True, text=True
            )
            if made.returncode == 0 or time.time() > deadline:
                break
            time.sleep(1)
        assert made.returncode == 0, made.stderr[-2000:]
        follower = subprocess.Popen(
            [sys.executable, "-m", "flows.follow", made.stdout.strip()],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(5)
        assert follower.poll() is None  # still following a run that has not started
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    out, err = follower.communicate(timeout=120)
    assert follower.returncode == exit_codes.FAILED, out + err
    assert "the Prefect server stopped answering" in err and "Traceback" not in err
