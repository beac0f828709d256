"""The fast recipe's switches (training/model.py, training/optim.py, training/config.py), each against what it
promises: off by default (the default trace is tests/unit/test_golden_trace.py's), and when on, the model,
optimizer and schedule they name. Real models and optimizers on CPU, no stand-ins."""

import io
import itertools

import pytest
import torch

from training.config import ConfigError, GPTConfig, OptimConfig, load_config
from training.hf import NotGPT2Shaped, to_hf
from training.memory import num_parameters
from training.model import GPT, Rotary
from training.optim import MuonWithAdamW, build_optimizer, hidden_matrices, lr_at

SMALL = {"block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 16}
SWITCHES = {
    "pos_emb": ["learned", "rope"],
    "qk_norm": [False, True],
    "mlp_act": ["gelu", "relu2"],
    "tie_embeddings": [True, False],
}


def combos():
    keys = list(SWITCHES)
    for values in itertools.product(*SWITCHES.values()):
        yield dict(zip(keys, values, strict=True))


def _learns_one_batch(model, opt) -> None:
    """Eight steps on one batch, learned by heart: the loss must fall."""
    x = torch.randint(0, 50257, (2, 16))
    losses = []
    for _ in range(8):
        opt.zero_grad()
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize("switches", list(combos()), ids=lambda d: "-".join(map(str, d.values())))
def test_every_combination_builds_trains_and_is_counted_as_the_memory_estimate_counts_it(switches):
    cfg = GPTConfig(**SMALL, **switches)
    torch.manual_seed(0)
    model = GPT(cfg)
    assert model.num_parameters() == num_parameters(cfg)
    assert (model.transformer.wpe is None) == (switches["pos_emb"] == "rope")
    assert (model.lm_head.weight is model.transformer.wte.weight) == switches["tie_embeddings"]
    opt = build_optimizer(model, OptimConfig(optimizer="muon", max_lr=1e-2, muon_lr=0.05), "cpu")
    _learns_one_batch(model, opt)


def test_rotary_scores_depend_only_on_the_distance_between_tokens():
    torch.manual_seed(0)
    rot = Rotary(head_dim=8, max_len=64)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def at(v, pos):  # v placed at `pos` of a sequence of zeros, rotated, and read back
        seq = torch.zeros(1, 1, 64, 8)
        seq[..., pos, :] = v
        return rot(seq)[..., pos, :]

    score = (at(q, 10) * at(k, 3)).sum()
    assert torch.allclose(score, (at(q, 40) * at(k, 33)).sum(), atol=1e-5)
    assert not torch.allclose(score, (at(q, 40) * at(k, 30)).sum(), atol=1e-3)
    assert torch.allclose(at(q, 0), q)  # position 0 is not turned


def test_relu2_zero_init_and_softcap_do_what_they_say():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL, mlp_act="relu2", zero_init_proj=True, logit_softcap=5.0))
    x = torch.randn(3, 7)
    assert torch.equal(model.transformer.h[0].mlp.gelu(x), torch.relu(x) ** 2)
    for block in model.transformer.h:  # every block starts as the identity
        assert not block.attn.c_proj.weight.any() and not block.mlp.c_proj.weight.any()
    with torch.no_grad():
        model.lm_head.weight.mul_(1000)  # logits far past the cap
        logits, _ = model(torch.randint(0, 50257, (1, 8)))
    assert logits.abs().max() <= 5.0 and logits.abs().max() > 4.9


@pytest.mark.parametrize(
    "switches",
    [
        {"value_embeds": 1},
        {"unet_skips": True},
        {"n_layer": 3, "value_embeds": 1, "unet_skips": True, "tie_embeddings": False},
        {"n_layer": 4, "value_embeds": 2, "unet_skips": True, "pos_emb": "rope"},
    ],
    ids=["value-embeds", "unet", "both-odd-untied", "both-even-rope"],
)
def test_value_embeddings_and_unet_skips_build_train_and_are_counted(switches):
    cfg = GPTConfig(**{**SMALL, **switches})
    torch.manual_seed(0)
    model = GPT(cfg)
    assert model.num_parameters() == num_parameters(cfg)
    t = model.transformer
    assert len(t.vte) == cfg.value_embeds
    # table k serves layer k and layer n_layer - value_embeds + k; the others take none
    served = [i for i, b in enumerate(t.h) if hasattr(b.attn, "value_mix")]
    n = cfg.value_embeds
    assert served == [*range(n), *range(cfg.n_layer - n, cfg.n_layer)]
    assert [cfg.value_table(i) for i in served] == [*range(n), *range(n)]
    if cfg.unet_skips:
        assert t.skip_weights.shape == (cfg.n_layer // 2,)
    # the tables are lookups (AdamW's), the gains 1-D (AdamW's): Muon keeps the blocks' matrices only
    opt = build_optimizer(model, OptimConfig(optimizer="muon", max_lr=1e-2, muon_lr=0.05), "cpu")
    assert len(opt.muon.param_groups[0]["params"]) == 4 * cfg.n_layer
    assert model.num_parameters(exclude_lookups=True) == model.num_parameters() - sum(
        e.weight.numel()
        for e in [
            *t.vte,
            *([t.wpe] if t.wpe is not None else []),
            *([] if cfg.tie_embeddings else [t.wte]),
        ]
    )
    _learns_one_batch(model, opt)
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} takes no part in the loss"


def test_neutral_value_mixes_and_skip_weights_give_back_the_plain_model_and_others_do_not():
    """v = 1*v + 0*ve, and skips weighted 0, are the model without the switches (its weights loaded as they
    are): what the switches add is exactly the mix and the skips."""
    cfg = GPTConfig(**{**SMALL, "n_layer": 4})
    torch.manual_seed(0)
    plain = GPT(cfg)
    both = GPT(cfg.model_copy(update={"value_embeds": 1, "unet_skips": True}))
    missing = both.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == [
        "transformer.h.0.attn.value_mix",
        "transformer.h.3.attn.value_mix",
        "transformer.skip_weights",
        "transformer.vte.0.weight",
    ]
    x = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        for i in (0, 3):
            both.transformer.h[i].attn.value_mix.copy_(torch.tensor([1.0, 0.0]))
        both.transformer.skip_weights.zero_()
        assert torch.allclose(both(x)[0], plain(x)[0], atol=1e-6)
        both.transformer.skip_weights.fill_(0.5)
        assert not torch.allclose(both(x)[0], plain(x)[0], atol=1e-3)
        both.transformer.skip_weights.zero_()
        both.transformer.h[3].attn.value_mix.copy_(torch.tensor([0.5, 0.5]))
        assert not torch.allclose(both(x)[0], plain(x)[0], atol=1e-3)


def test_muon_takes_the_hidden_matrices_and_adamw_every_other_parameter_once():
    model = GPT(GPTConfig(**SMALL, tie_embeddings=False))
    o = OptimConfig(optimizer="muon", max_lr=1e-3, muon_lr=0.02, weight_decay=0.1)
    opt = build_optimizer(model, o, "cpu")
    assert isinstance(opt, MuonWithAdamW)
    muon = [p for g in opt.muon.param_groups for p in g["params"]]
    adamw = [p for g in opt.adamw.param_groups for p in g["params"]]
    hidden = hidden_matrices(model)
    assert {id(p) for p in muon} == {id(p) for p in hidden} and len(hidden) == 4 * SMALL["n_layer"]
    assert all(p.dim() == 2 for p in muon)
    everything = {id(p) for p in model.parameters()}
    assert len(muon) + len(adamw) == len(everything) and {id(p) for p in muon + adamw} == everything
    in_adamw = {id(p) for p in adamw}
    assert id(model.lm_head.weight) in in_adamw and id(model.transformer.wte.weight) in in_adamw
    # the schedule moves both rates together, Muon's at its own multiple
    from training.step import StepSetup, train_step

    x = torch.randint(0, 50257, (2, 9))
    setup = StepSetup(model, opt, lambda: (x[:, :-1], x[:, 1:]), 1, torch.device("cpu"), 1.0)
    train_step(setup, lr_at(0, o, 100))
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs[0] == pytest.approx(0.02 * lr_at(0, o, 100) / 1e-3) and set(lrs[1:]) == {
        lr_at(0, o, 100)
    }


def test_muon_state_resumes_bit_exactly_through_its_saved_bytes():
    """What a checkpoint does with the optimizer (training/checkpoint.py: torch.save, then a weights_only
    load): 3 + 3 steps across a save and restore equal 6 straight."""
    cfg = GPTConfig(**SMALL, pos_emb="rope", value_embeds=1, unet_skips=True)
    o = OptimConfig(optimizer="muon", max_lr=1e-2)
    x = torch.randint(0, 50257, (2, 17), generator=torch.Generator().manual_seed(1))

    def fresh():
        torch.manual_seed(0)
        model = GPT(cfg)
        return model, build_optimizer(model, o, "cpu")

    def steps(model, opt, n):
        for _ in range(n):
            opt.zero_grad()
            model(x[:, :-1], x[:, 1:])[1].backward()
            opt.step()

    straight, opt = fresh()
    steps(straight, opt, 6)
    first, opt = fresh()
    steps(first, opt, 3)
    blob = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt.state_dict()}, blob)
    saved = torch.load(io.BytesIO(blob.getvalue()), weights_only=True)
    resumed, opt2 = fresh()
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["optim"])
    steps(resumed, opt2, 3)
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_an_adamw_checkpoint_is_not_loaded_into_muon():
    model = GPT(GPTConfig(**SMALL))
    adamw = build_optimizer(model, OptimConfig(), "cpu")
    muon = build_optimizer(model, OptimConfig(optimizer="muon"), "cpu")
    with pytest.raises(ValueError, match="not Muon \\+ AdamW"):
        muon.load_state_dict(adamw.state_dict())


def test_trapezoid_warms_up_holds_and_cools_down_linearly():
    o = OptimConfig(
        schedule="trapezoid", max_lr=1.0, min_lr_ratio=0.0, warmup_steps=10, cooldown_frac=0.4
    )
    lrs = [lr_at(s, o, 100) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0
    assert set(lrs[10:60]) == {1.0}  # stable until the last 40% of the steps
    assert lrs[80] == pytest.approx(0.5) and lrs[100] == 0.0
    assert all(a >= b for a, b in zip(lrs[60:], lrs[61:], strict=False))


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (
            ["model.n_embd=18", "model.n_head=6", "model.pos_emb=rope"],
            "head size (n_embd / n_head = 3) is odd",
        ),
        (["optim.optimizer=sgd"], "optim.optimizer"),
        (["model.mlp_act=swish"], "model.mlp_act"),
        (
            ["model.value_embeds=2"],
            "model.value_embeds=2 tables serve the first and the last 2 layers",
        ),
        (["model.n_layer=1", "model.unet_skips=true"], "model.unet_skips joins the first half"),
    ],
)
def test_switches_that_do_not_fit_are_one_clear_error(overrides, needle):
    with pytest.raises(ConfigError, match=None) as err:
        load_config("tiny", overrides)
    assert needle in str(err.value)


def test_a_model_that_is_not_gpt2_shaped_is_not_exported_to_hugging_face():
    with pytest.raises(NotGPT2Shaped, match=r"model.pos_emb=rope, model.tie_embeddings=False"):
        to_hf(GPT(GPTConfig(**SMALL, pos_emb="rope", tie_embeddings=False)))
    assert GPTConfig(**SMALL, zero_init_proj=True).not_gpt2() == []  # only where it starts
    with pytest.raises(NotGPT2Shaped, match=r"model.value_embeds=1, model.unet_skips=True"):
        to_hf(GPT(GPTConfig(**SMALL, value_embeds=1, unet_skips=True)))
