"""Loss spikes and non-finite steps: skipped, counted, and a run that keeps diverging stopped with exit code 3,
deterministically; the poison is the guard's own fault injection (debug.fault_*), a real NaN or spike through
the real training step."""

import json
import random

from training.config import GuardConfig
from training.guard import Divergence, StepGuard


def test_the_guard_skips_non_finite_and_spiking_steps_but_not_noise():
    guard = StepGuard(GuardConfig(zscore=6, zscore_warmup=50, zscore_window=100))
    rng = random.Random(0)
    for step in range(400):  # a noisy, falling loss and a noisy gradient norm: nothing to skip
        loss, norm = 4 - step / 200 + rng.gauss(0, 0.05), 0.5 + abs(rng.gauss(0, 0.1))
        assert guard.check(step, step, loss, norm) is None, step
    assert guard.check(400, 400, float("nan"), 0.5) == "non-finite loss"
    assert guard.check(401, 401, 2.0, float("inf")) == "non-finite gradient norm"
    assert guard.check(402, 402, 9.0, 0.5).startswith("loss spike")
    assert guard.check(403, 403, 2.0, 40.0).startswith("gradient norm spike")
    assert guard.check(404, 404, 2.0, 0.5) is None  # the skipped values did not enter the history
    assert guard.diverged() is None  # 4 skips: under max_skips (5)
    assert guard.check(405, 405, float("nan"), 1.0)
    verdict = guard.diverged()
    assert verdict.to_json() == {
        "steps": [400, 405],
        "batches": "400:406",
        "reasons": [
            "gradient norm spike",
            "loss spike",
            "non-finite gradient norm",
            "non-finite loss",
        ],
    }
    assert (
        Divergence.from_json(verdict.to_json()) == verdict
    )  # the form result.json and the flow share
    # its state goes into checkpoints: a resumed guard decides as the uninterrupted one
    again = StepGuard(guard.cfg)
    again.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    assert again.check(406, 406, 9.0, 0.5) == guard.check(406, 406, 9.0, 0.5)
    assert again.diverged() == guard.diverged()


def test_skips_outside_the_window_do_not_add_up():
    guard = StepGuard(GuardConfig(max_skips=3, skip_window=10))
    for step in (0, 11, 22, 33):
        guard.check(step, step, float("nan"), 1.0)
    assert guard.diverged() is None
