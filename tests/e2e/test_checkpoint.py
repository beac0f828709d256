import json
import logging

import pytest
import torch

from training import checkpoint as ck
from training.config import load_config
from training.model import GPT
from training.optim import configure_optimizer


def _write(run_dir, step, model, opt, cfg, rank_state=None):
    return ck.write_checkpoint(
        run_dir,
        step,
        model=model,
        optimizer=opt,
        config=cfg,
        rank_state=rank_state or {"loader": {"pos": step}, "rng": torch.get_rng_state()},
    )


@pytest.fixture
def setup():
    cfg = load_config("tiny")
    model = GPT(cfg.model)
    opt = configure_optimizer(model, lr=1e-3, weight_decay=0.1)
    model(torch.randint(0, 50257, (2, 8)), torch.randint(0, 50257, (2, 8)))[1].backward()
    opt.step()
    return cfg, model, opt


def test_round_trip_restores_model_optimizer_and_rank_state(tmp_path, setup):
    cfg, model, opt = setup
    run = str(tmp_path / "run")
    url = _write(run, 10, model, opt, cfg)
    ckpt = ck.latest_checkpoint(run)
    assert ckpt.url == url and ckpt.step == 10 and ckpt.config() == cfg
    fresh, _, step = ck.load_model(run)
    assert step == 10 and fresh.lm_head.weight is fresh.transformer.wte.weight
    for (n, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), n
    opt2 = configure_optimizer(fresh, lr=1e-3, weight_decay=0.1)
    opt2.load_state_dict(ckpt.optimizer_state())
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)
    assert ckpt.rank_state(0)["loader"] == {"pos": 10}
    assert ckpt.train_state().code_version


def test_incomplete_and_corrupt_checkpoints_are_skipped(tmp_path, setup, caplog):
    cfg, model, opt = setup
    run = str(tmp_path / "run")
    _write(run, 10, model, opt, cfg)
    _write(run, 20, model, opt, cfg)
    _write(run, 30, model, opt, cfg)
    (tmp_path / "run/checkpoints/step_000030/manifest.json").unlink()  # crashed before the manifest
    blob = tmp_path / "run/checkpoints/step_000020/model.safetensors"
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))  # bit rot
    with caplog.at_level(logging.WARNING):
        ckpt = ck.latest_checkpoint(run)
    assert ckpt.step == 10
    assert (
        "step_000030" in caplog.text and "step_000020" in caplog.text and "corrupt" in caplog.text
    )
    with pytest.raises(ck.CheckpointError, match="corrupt"):
        ck.load_model(str(tmp_path / "run/checkpoints/step_000020"))


def test_retention_keeps_last_k_and_every_n(tmp_path, setup):
    cfg, model, _ = setup
    run = str(tmp_path / "run")
    for step in range(10, 110, 10):
        _write(run, step, model, None, cfg)
    deleted = ck.prune(run, keep_last=2, keep_every=50, current_step=100)
    assert ck.list_steps(run) == [50, 90, 100]
    assert sorted(deleted) == [10, 20, 30, 40, 60, 70, 80]


def test_loading_never_unpickles_code(tmp_path, setup):
    cfg, model, opt = setup
    run = str(tmp_path / "run")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    url = ck.write_checkpoint(
        run, 5, model=model, optimizer=opt, config=cfg, rank_state={"x": Evil()}
    )
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        ck.open_checkpoint(url).rank_state(0)


def test_a_manifest_edited_to_another_step_is_not_resumed_from(tmp_path, setup, caplog):
    """The manifest names the step; train_state.json (hashed in it) says it too. When they disagree (a
    manifest edited, a folder copied under another step's name), the weights are another step's: refused."""
    cfg, model, opt = setup
    run = tmp_path / "run"
    url = _write(str(run), 5, model, opt, cfg)
    manifest = json.loads((run / "checkpoints" / "step_000005" / "manifest.json").read_text())
    manifest["step"] = 9
    (run / "checkpoints" / "step_000005" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        ck.CheckpointError, match=r"manifest says step 9 .* train_state.json step 5"
    ):
        ck.open_checkpoint(url).train_state()
    with caplog.at_level(logging.WARNING):
        assert ck.latest_checkpoint(str(run)) is None  # skipped, said: no silent resume
    assert "manifest says step 9" in caplog.text
