import json
import subprocess
import sys

import numpy as np
from helpers import REPO

from common import store
from evaluation.plots import read_hellaswag
from training import checkpoint as ck
from training.config import load_config
from training.metrics import read_metrics
from training.model import GPT


def test_plot_cli_draws_loss_and_hellaswag_curves(tmp_path):
    run = str(tmp_path / "run")
    cfg = load_config("tiny")
    model = GPT(cfg.model)
    for step, acc in ((10, 0.25), (20, 0.27)):
        url = ck.write_checkpoint(run, step, model=model, optimizer=None, config=cfg, rank_state={})
        store.write_json(
            store.join(url, "eval", "hellaswag.json"), {"acc_norm": acc, "acc": acc, "n": 10}
        )
    rows = [
        {"step": s, "loss": 10 - s / 5, **({"val_loss": 9.9 - s / 5} if s % 5 == 0 else {})}
        for s in range(20)
    ]
    (tmp_path / "run" / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 2'
    )
    assert len(read_metrics(run)) == 20  # a torn last line (writer killed mid-line) is skipped
    assert read_hellaswag(run) == [(10, 0.25), (20, 0.27)]
    p = subprocess.run(
        [sys.executable, "-m", "evaluation.plots", run],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    import matplotlib.pyplot as plt

    img = plt.imread(tmp_path / "run" / "curves.png")
    assert img.shape[0] > 300 and img.shape[1] > 800
    assert np.unique(img.reshape(-1, img.shape[-1]), axis=0).shape[0] > 20  # something was drawn


def test_plot_without_metrics_is_a_clear_error(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "evaluation.plots", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "no metrics.jsonl" in p.stderr
