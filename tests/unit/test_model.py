import math

import pytest
import torch
from torch.nn import functional as F

from training.config import GPTConfig, load_config
from training.model import GPT, flops_per_token
from training.optim import configure_optimizer, cosine_lr


def test_124m_parameter_count():
    model = GPT(GPTConfig(pad_vocab_to=1))
    assert model.num_parameters() == 124_439_808
    padded = GPT(GPTConfig())  # 50304 rows: 47 extra embedding rows of 768
    assert padded.num_parameters() == 124_439_808 + 47 * 768


def test_lm_head_is_tied_to_wte_and_optimised_once():
    model = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=16))
    assert model.lm_head.weight is model.transformer.wte.weight
    opt = configure_optimizer(model, lr=1e-3, weight_decay=0.1)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert ids.count(id(model.lm_head.weight)) == 1 and len(ids) == len(set(ids))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() < 2 for p in no_decay["params"])
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8
    assert not opt.defaults.get("fused")  # fused only on CUDA


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=64, n_layer=8, n_head=4, n_embd=256)
    model = GPT(cfg)
    blk = model.transformer.h[0]
    assert blk.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    want = 0.02 * (2 * cfg.n_layer) ** -0.5
    assert blk.attn.c_proj.weight.std().item() == pytest.approx(want, rel=0.05)
    assert blk.mlp.c_proj.weight.std().item() == pytest.approx(want, rel=0.05)
    assert model.transformer.wpe.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.count_nonzero(blk.mlp.c_fc.bias) == 0


def test_padded_vocab_never_reaches_the_output():
    cfg = GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16)
    model = GPT(cfg)
    with torch.no_grad():
        model.lm_head.weight[cfg.vocab_size :] = 100.0  # would win every argmax if it leaked
    x, y = torch.randint(0, cfg.vocab_size, (2, 8)), torch.randint(0, cfg.vocab_size, (2, 8))
    logits, loss = model(x, y)
    assert logits.shape == (2, 8, cfg.vocab_size) and cfg.padded_vocab_size == 50304
    assert logits.argmax(-1).max().item() < cfg.vocab_size
    # the loss is over the real vocabulary alone, and the padded rows learn nothing from it
    assert loss.item() == pytest.approx(
        F.cross_entropy(logits.reshape(-1, cfg.vocab_size), y.reshape(-1)).item()
    )
    loss.backward()
    assert torch.count_nonzero(model.lm_head.weight.grad[cfg.vocab_size :]) == 0


def test_attention_is_causal_and_loss_is_cross_entropy():
    cfg = GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=16)
    model = GPT(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % cfg.vocab_size
    lx, loss = model(x, x)
    ly, _ = model(y)
    assert torch.allclose(lx[0, :8], ly[0, :8]) and not torch.allclose(lx[0, 8:], ly[0, 8:])
    # a fresh model predicts roughly uniformly
    assert loss.item() == pytest.approx(math.log(cfg.vocab_size), abs=0.3)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_lr_schedule_warmup_then_cosine_to_floor():
    kw = dict(max_lr=6e-4, min_lr=6e-5, warmup_steps=715, max_steps=19073)
    assert cosine_lr(0, **kw) == pytest.approx(6e-4 / 715)
    assert cosine_lr(714, **kw) == pytest.approx(6e-4)
    mid = 715 + (19073 - 715) // 2
    assert cosine_lr(mid, **kw) == pytest.approx((6e-4 + 6e-5) / 2, rel=1e-3)
    assert cosine_lr(19073, **kw) == pytest.approx(6e-5)
    assert all(cosine_lr(s, **kw) >= cosine_lr(s + 1, **kw) for s in range(715, 19073, 97))


def test_flops_per_token_matches_formula():
    cfg = GPTConfig()
    n = 124_475_904
    assert flops_per_token(cfg, n, 1024) == 6 * n + 12 * 12 * 12 * 64 * 1024


def _grads(model, x, y, amp, **kw):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16) if amp else torch.enable_grad():
        logits, loss = model(x, y, **kw)
    loss.backward()
    return logits, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize(
    "head", [{}, {"logit_softcap": 0.5, "tie_embeddings": False}], ids=["gpt2", "softcap-untied"]
)
def test_chunked_loss_gives_the_plain_loss_and_gradients(amp, head):
    # a cap of 0.5 is far inside the logits' range, so tanh's curvature is in every gradient
    cfg = GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32, **head)
    model = GPT(cfg)
    with torch.no_grad():
        model.lm_head.weight[cfg.vocab_size :] = (
            100.0  # the padded rows must stay out of the softmax
        )
    x = torch.randint(0, cfg.vocab_size, (3, 32))
    y = torch.randint(0, cfg.vocab_size, (3, 32))
    _, loss, grads = _grads(model, x, y, amp)
    logits, chunked, chunked_grads = _grads(
        model, x, y, amp, loss_chunk=40
    )  # 96 tokens: 40 + 40 + 16
    assert logits is None  # the point: no full logits
    assert chunked.item() == pytest.approx(loss.item(), rel=1e-6 if not amp else 1e-3)
    tol = (
        1e-5 if not amp else 2e-2
    )  # bf16: the chunked path sums lm_head's gradient in fp32, the plain one in bf16
    for name, g in grads.items():
        err = (chunked_grads[name] - g).abs().max() / g.abs().max()
        assert err < tol, (name, err.item())
    head_grad = chunked_grads.get("lm_head.weight", chunked_grads["transformer.wte.weight"])
    assert torch.count_nonzero(head_grad[cfg.vocab_size :]) == 0
    with torch.no_grad():  # evaluation: the loss alone
        assert model(x, y, loss_chunk=7)[1].item() == pytest.approx(model(x, y)[1].item(), rel=1e-5)


def test_model_overfits_a_single_batch(demo_data):
    """The lecture's first sanity check: the tiny model memorises one fixed batch."""
    from training.loader import ShardLoader

    cfg = load_config("tiny")
    torch.manual_seed(0)
    model = GPT(cfg.model)
    opt = configure_optimizer(model, lr=1e-2, weight_decay=0.0)
    x, y = ShardLoader(demo_data, "train", 4, 32).next_batch()
    x, y = x.long(), y.long()
    for step in range(300):  # noqa: B007 (named in the message)
        opt.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        if loss.item() < 0.1:
            break
    assert loss.item() < 0.1, f"loss {loss.item():.3f} after {step + 1} steps"
