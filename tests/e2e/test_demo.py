"""`bash scripts/demo.sh` as a newcomer runs it: a fresh copy of this checkout, the README's command, shortened
by DEMO_STEPS; its own Prefect server (real), the served deployments, `prefect deployment run` followed by
`python -m flows.follow`, the local
executor, the offline corpus and evaluation task; the run page checked in headless Chromium."""

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, free_port


def _fresh_copy(dst: Path) -> Path:
    """What a clone of this checkout holds: tracked files and untracked ones git does not ignore."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        if (REPO / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    # The copy's set-up shares this virtualenv: it must find it up to date, or it would install the project
    # again from the copy, a temporary folder (the editable install would then point there).
    subprocess.run(
        ["bash", "scripts/setup.sh"],
        cwd=REPO,
        env={**os.environ, "VENV": sys.prefix},
        check=True,
        capture_output=True,
    )
    clone = _fresh_copy(tmp_path_factory.mktemp("newcomer") / "gpt2-repro")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        VENV=str(Path(sys.prefix)),
        PREFECT_PORT=str(port),
        DEMO_STEPS="40",
        OMP_NUM_THREADS="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    p = subprocess.run(
        ["bash", "scripts/demo.sh"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
        start_new_session=True,
    )  # the server it leaves running is in its own process group
    yield {
        "p": p,
        "clone": clone,
        "api": f"http://127.0.0.1:{port}/api",
        "ui": f"http://127.0.0.1:{port}",
    }
    pid_file = clone / ".prefect" / "server.pid"
    if pid_file.exists():
        try:
            os.killpg(os.getpgid(int(pid_file.read_text())), signal.SIGTERM)
        except ProcessLookupError:
            pass


def test_the_demo_runs_the_deployment_and_shows_a_model_that_learns(demo):
    p, run = demo["p"], demo["clone"] / "store" / "runs" / "demo-40"
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    out = p.stdout
    assert "prefect deployment run pretrain-gpt2/demo" in out
    assert re.search(r"/runs/flow-run/[0-9a-f-]{36}", out)  # the run's URL, to open in the UI
    # the console tells the run's story, not Prefect's events: the data prep, the submission, the progress,
    # each evaluation, how it ended, the result
    for line in (
        r"\[prepare-data\] tokenized [\d,]+ tokens",
        r"submission 1: job local-\d+ from step 0",
        r"step \d+/40 \(",
        r"evaluated step 20",
        r"the run ended Completed",
    ):
        assert re.search(line, out), (line, out[-3000:])
    assert "prefect.artifact" not in out and len(out.splitlines()) < 80, out
    m = re.search(
        r"val loss ([0-9.]+) nats \(from ([0-9.]+) at the start\) vs ([0-9.]+) nats unigram entropy",
        out,
    )
    assert m, out[-3000:]
    val, first, unigram = map(float, m.groups())
    assert (
        val < first - 1.0
    )  # 40 steps already bend the curve (the full demo goes well below the unigram line)
    assert (
        "step     20: ours " in out
        and "lm eval demo hellaswag" in out
        and "best checkpoint: step" in out
    )
    assert (run / "curves.png").exists()
    assert (run / "checkpoints" / "step_000040" / "eval" / "lm_eval.json").exists()


def test_the_run_page_shows_its_task_runs_and_the_evaluation_table(demo):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    assert demo["p"].returncode == 0

    async def read():
        async with get_client() as client:
            runs = [
                r
                for r in await client.read_flow_runs()
                if r.parameters.get("params", {}).get("run_name") == "demo-40"
            ]
            tasks = await client.read_task_runs()
            return runs[0], tasks, await client.read_artifacts()

    with temporary_settings({PREFECT_API_URL: demo["api"]}):
        flow_run, task_runs, artifacts = asyncio.run(read())
    names = {t.name: t for t in task_runs if t.flow_run_id == flow_run.id}
    assert any(n.startswith("submission 1 (job local-") for n in names), sorted(names)
    assert {"evaluate step 20", "evaluate step 40"} <= set(names)
    assert all(t.state.is_completed() for t in names.values())
    table = next(a for a in artifacts if a.key == "demo-40-checkpoints")
    assert '"step": 20' in table.data.replace("'", '"') and "demo_hellaswag" in table.data

    from browser import chromium_path, dump_dom

    if chromium_path() is None:
        pytest.skip("no chromium and no way to install it (needs root and apt-get)")
    dom = dump_dom(f"{demo['ui']}/v2/runs/flow-run/{flow_run.id}?tab=TaskRuns")
    assert "evaluate step 20" in dom and "submission 1 (job local-" in dom
    dom = dump_dom(f"{demo['ui']}/v2/artifacts/artifact/{table.id}")
    assert "demo_hellaswag" in dom and "hellaswag_acc_norm" in dom
